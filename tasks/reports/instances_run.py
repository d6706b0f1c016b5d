"""Log a scan's instances to MLflow: one run ``instances <scan>`` in the dataset's experiment.

The run carries the method and its parameters, the instance count (in total and per class), the
table (``instances/instances.parquet``: id, class, score, box, area, centroid in pixels and in world
coordinates, tasks/instances/table.py), for a raster with a CRS and up to 5000 instances their
polygons as ``instances/instances.geojson`` (the MLflow UI draws it on a map) and, where the dataset
has stuff classes, the panoptic segments. Client API, as in :mod:`tasks.reports.tracking`: no process-wide active run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tasks.instances import store as inst_store

ARTIFACT_DIR = "instances"
PREVIEW_MAX = 5000  # instances drawn as a GeoJSON artifact (the MLflow UI previews it on a map)


def log_instances(store: str, dataset: str, outcome: dict, parent_run_id: str | None = None) -> str:
    """A finished MLflow run for the instances of ``store`` (``outcome``: what the instance step
    returned: method, count, seconds, ...); returns its run id."""
    import fsspec
    import pyarrow.parquet as pq
    from mlflow.entities import Metric, Param, RunTag

    from models.registry import client, experiment_id

    scan_id = Path(str(store).rstrip("/")).name.removesuffix(".zarr")
    record = inst_store.read_instances_record(store) or {}
    pred = inst_store.storage.read_record(inst_store.prediction_url(store)) or {}
    tags = {"tilewise.step": "instances", "tilewise.scan": scan_id, "tilewise.store": str(store),
            "tilewise.dataset": dataset, "tilewise.model": str(pred.get("model", "unknown")),
            "tilewise.instances_digest": str(record.get("digest", ""))}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    c = client()
    run = c.create_run(experiment_id(dataset), run_name=f"instances {scan_id}",
                       tags={"mlflow.runName": f"instances {scan_id}", **tags})
    run_id, status = run.info.run_id, "FAILED"
    try:
        ts = int(run.info.start_time)
        with fsspec.open(inst_store.table_url(store), "rb") as fh:
            table = pq.read_table(fh)
        metrics = [Metric("instances", float(table.num_rows), ts, 0),
                   Metric("instances_seconds", float(outcome.get("seconds") or 0.0), ts, 0)]
        if table.num_rows and "class_name" in table.column_names:
            names, counts = _counts(table.column("class_name").to_pylist())
            metrics += [Metric(f"instances_{n}", float(k), ts, 0) for n, k in zip(names, counts)]
        params = [Param("method", str(record.get("source", outcome.get("method", "")))),
                  *[Param(f"instances.{k}", str(v)[:500]) for k, v in sorted((record.get("params") or {}).items())]]
        c.log_batch(run_id, metrics=metrics, params=params[:100], tags=[RunTag(k, v) for k, v in tags.items()])
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / inst_store.TABLE
            pq.write_table(table, local)
            c.log_artifact(run_id, str(local), ARTIFACT_DIR)
            polygons = _polygons_for_preview(store, table.num_rows, Path(tmp))
            if polygons is not None:  # the MLflow UI draws a GeoJSON artifact on a map
                c.log_artifact(run_id, str(polygons), ARTIFACT_DIR)
        if outcome.get("panoptic"):
            c.log_dict(run_id, outcome["panoptic"], f"{ARTIFACT_DIR}/panoptic_segments.json")
        status = "FINISHED"
    finally:
        c.set_terminated(run_id, status=status)
    return run_id


def _polygons_for_preview(store: str, count: int, folder: Path) -> Path | None:
    """``instances.geojson`` (EPSG:4326) for a raster scan with a CRS and at most PREVIEW_MAX
    instances, else None."""
    from tasks.errors import ScanError
    from tasks.export import ExportOptions, export_scan

    record = inst_store.storage.read_record(store) or {}
    spatial = record.get("spatial") or {}
    if count > PREVIEW_MAX or spatial.get("format") != "geotiff" or not spatial.get("crs_wkt"):
        return None
    out = folder / "instances.geojson"
    try:
        export_scan(store, ExportOptions("geojson", str(out), what="instances"))
    except ScanError:
        return None
    return out


def _counts(values: list) -> tuple[list[str], list[int]]:
    found: dict[str, int] = {}
    for v in values:
        found[str(v)] = found.get(str(v), 0) + 1
    names = sorted(found)
    return names, [found[n] for n in names]

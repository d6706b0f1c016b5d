"""The ``export`` flow: every predicted scan of a dataset in the catalog's ``export.format``.

Outputs go to ``$TILEWISE_HOME/exports/<dataset>/<scan><suffix>`` (or ``out_dir``); ``zarr``
writes the NGFF label image into each store. Scans without a complete prediction are skipped with
a warning; an unchanged prediction is not exported again (status ``unchanged``).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait

from data_catalog import DEFAULT_CATALOG_DIR, find_entry
from flows.ingest import transient_io_error
from flows.outcomes import ScanOutcome, final_state
from tasks import storage
from tasks.export import ExportOptions, ExportResult, export_scan
from tasks.export.export import DEFAULT_SUFFIX
from tasks.ingest import discover_scans
from tasks.settings import scan_store, tilewise_home


@task(name="export-scan", task_run_name="export {store}", retries=2, retry_delay_seconds=[2, 10],
      retry_condition_fn=transient_io_error, cache_policy=NO_CACHE, persist_result=False)
def export_scan_task(store: str, options: ExportOptions) -> ExportResult:
    return export_scan(store, options)


def export_path(dataset: str, scan_id: str, fmt: str, out_dir: str | None = None, what: str = "labels") -> str | None:
    """``exports/<dataset>/<scan><suffix>``; instances ``<scan>.instances<suffix>``."""
    if fmt == "zarr":
        return None
    folder = Path(out_dir) if out_dir else tilewise_home() / "exports" / dataset
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / f"{scan_id}{'.instances' if what == 'instances' else ''}{DEFAULT_SUFFIX[fmt]}")


@flow(name="export", flow_run_name="export {dataset}")
def export_flow(dataset: str, catalog: str = str(DEFAULT_CATALOG_DIR), fmt: str | None = None,
                out_dir: str | None = None, what: str = "labels", force: bool = False,
                store_root: str | None = None):
    """Export the dataset's complete predictions (format: ``fmt`` or the catalog's ``export.format``)."""
    logger = get_run_logger()
    loaded = find_entry(dataset, Path(catalog))
    fmt = fmt or (loaded.entry.export.format if loaded.entry.export else None)
    if fmt is None:
        raise ValueError(f"dataset '{dataset}' has no export format in the catalog; pass one")
    scans = [(s.scan_id, scan_store(dataset, s.scan_id, store_root)) for s in discover_scans(loaded)]
    ready = [(sid, st) for sid, st in scans
             if storage.is_complete(st) and (storage.read_record(f"{st}/prediction") or {}).get(storage.COMPLETE_KEY)]
    if len(ready) < len(scans):
        logger.warning("%d scans have no complete prediction and are skipped", len(scans) - len(ready))
    futures = [export_scan_task.submit(st, ExportOptions(fmt, export_path(dataset, sid, fmt, out_dir, what),
                                                         what=what, force=force))
               for sid, st in ready]
    wait(futures)
    outcomes = []
    for (scan_id, store), future in zip(ready, futures):
        if future.state.is_completed():
            r = future.result()
            outcomes.append(ScanOutcome(dataset, scan_id, "export", r.status, store, r.out, r.seconds))
        else:
            err = future.state.result(raise_on_failure=False)
            outcomes.append(ScanOutcome(dataset, scan_id, "export", "failed", store, str(err)))
    return final_state(outcomes, key=f"export-{dataset.lower().replace('_', '-').replace('.', '-')}")

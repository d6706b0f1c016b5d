"""Log an evaluation to MLflow: one run in the dataset's experiment (``tilewise/<dataset>``).

The run carries tags (scan, store, model version, calibrator, reference), the flat metrics
(``mean_iou``, ``dice_<class>``, ``hd95_<class>``, ``ece`` ...), the whole report as
``evaluation/metrics.json`` and the pictures (overlay, reliability diagram) as images, so the
MLflow UI shows them on the run page. The client API is used (not ``mlflow.start_run``): it keeps
no process-wide "active run", so evaluations in parallel threads (Prefect tasks) do not mix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from tasks.metrics.evaluate import EvaluationReport

IMAGE_DIR = "evaluation"


def dataset_of(report: EvaluationReport) -> str:
    """The store's dataset, else the folder holding the store (``stores/<dataset>/<scan>.zarr``)."""
    return report.dataset or Path(report.store).parent.name or "unknown"


def log_evaluation(report: EvaluationReport, images: Sequence[str | Path] = (), parent_run_id: str | None = None) -> str:
    """Create a finished MLflow run for ``report``; returns its run id. ``parent_run_id``: nest it
    under that run (the nightly job's run of the dataset; MLflow's ``mlflow.parentRunId`` tag)."""
    from mlflow.entities import Metric, Param, RunTag
    from PIL import Image

    from models.registry import client, experiment_id

    c = client()
    dataset = dataset_of(report)
    calibrator = report.calibrator
    if isinstance(calibrator, dict):
        calibrator = calibrator.get("uri") or calibrator.get("method") or json.dumps(calibrator, sort_keys=True)
    tags = {
        "tilewise.step": "evaluate", "tilewise.scan": report.scan_id, "tilewise.store": report.store,
        "tilewise.dataset": dataset, "tilewise.model": report.model or "unknown",
        "tilewise.calibrator": str(calibrator) if calibrator else "none", "tilewise.reference": report.reference,
        "tilewise.prediction_digest": report.prediction_digest or "",
    }
    if report.drift is not None:  # the user's cue: this scan looks unlike the model's validation scans
        tags["tilewise.drift"] = report.drift["message"] if report.drift["far"] else "none"
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(experiment_id(dataset), run_name=f"evaluate {report.scan_id}",
                       tags={"mlflow.runName": f"evaluate {report.scan_id}", **tags})
    run_id = run.info.run_id
    status = "FAILED"
    try:
        timestamp = int(run.info.start_time)
        metrics = [Metric(k, v, timestamp, 0) for k, v in sorted(report.flat_metrics().items())]
        params = [Param("classes", ",".join(report.classes)), Param("pixels", str(report.pixels)),
                  Param("modality", str(report.modality))]
        if report.surface:
            params += [Param("surface_tolerance", f"{report.surface['tolerance']} {report.surface['unit'] or ''}".strip()),
                       Param("surface_level", str(report.surface["surface_level"]))]
        metrics.append(Metric("evaluate_seconds", float(report.seconds), timestamp, 0))
        c.log_batch(run_id, metrics=metrics[:900], params=params, tags=[RunTag(k, v) for k, v in tags.items()])
        for i in range(900, len(metrics), 900):  # log_batch takes at most 1000 metrics
            c.log_batch(run_id, metrics=metrics[i: i + 900])
        c.log_dict(run_id, report.to_dict(), f"{IMAGE_DIR}/metrics.json")
        for path in images:
            path = Path(path)
            with Image.open(path) as picture:
                c.log_image(run_id, picture.convert("RGB"), artifact_file=f"{IMAGE_DIR}/{path.name}")
        status = "FINISHED"
    finally:
        c.set_terminated(run_id, status=status)
    return run_id

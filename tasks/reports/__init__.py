"""What a user looks at after an evaluation: overlays (PNG), the reliability diagram, the MLflow run."""

from __future__ import annotations

from pathlib import Path


def report_dir(dataset: str | None, scan_id: str) -> Path:
    """Where the pictures of an evaluation go: ``$TILEWISE_HOME/reports/<dataset>/<scan>/``."""
    from tasks.settings import tilewise_home

    return tilewise_home() / "reports" / (dataset or "unknown") / scan_id


def evaluate_and_report(store: str, labels_path=None, entry=None, boundary_class: str | None = None,
                        log_mlflow: bool = True, parent_run_id: str | None = None):
    """Evaluate ``store`` (tasks.metrics.evaluate.evaluate_scan), draw its pictures and, unless
    ``log_mlflow`` is False, log everything to an MLflow run (nested under ``parent_run_id`` when
    given). Returns (report, images, run id or None)."""
    from tasks.metrics.evaluate import evaluate_scan
    from tasks.reports.overlay import evaluation_images

    report = evaluate_scan(store, labels_path=labels_path, entry=entry, boundary_class=boundary_class)
    images = evaluation_images(report, report_dir(report.dataset, report.scan_id))
    run_id = None
    if log_mlflow:
        from tasks.reports.tracking import log_evaluation

        run_id = log_evaluation(report, images, parent_run_id=parent_run_id)
    return report, images, run_id

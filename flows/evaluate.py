"""The ``evaluate`` flow: score every predicted scan of a dataset against its reference labels."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait

from data_catalog import DEFAULT_CATALOG_DIR, find_entry
from data_catalog.schema import CatalogEntry
from flows.outcomes import ScanOutcome, final_state
from tasks import storage
from tasks.ingest import discover_scans
from tasks.reports import evaluate_and_report
from tasks.settings import scan_store


@task(name="evaluate-scan", task_run_name="evaluate {store}", cache_policy=NO_CACHE, persist_result=False)
def evaluate_scan_task(store: str, entry: CatalogEntry, log_mlflow: bool = True) -> tuple[dict, str | None]:
    """Metrics JSON into the prediction's attributes, pictures, and an MLflow run (unless told not to)."""
    report, _, run_id = evaluate_and_report(store, entry=entry, log_mlflow=log_mlflow)
    return report.flat_metrics(), run_id


def _predicted(store: str) -> bool:
    return storage.is_complete(store) and storage.is_complete(f"{store}/prediction")


@flow(name="evaluate", flow_run_name="evaluate {dataset}")
def evaluate_flow(dataset: str, catalog: str = str(DEFAULT_CATALOG_DIR), store_root: str | None = None,
                  log_mlflow: bool = True):
    """Evaluate each scan of ``dataset`` that has a complete prediction; the others are skipped.
    One failing scan does not stop the others; the flow ends Failed naming each failure."""
    logger = get_run_logger()
    loaded = find_entry(dataset, Path(catalog))
    if loaded.entry.labels is None:
        logger.warning("dataset '%s' has no labels in the catalog: nothing to evaluate", dataset)
        return final_state([], key=f"evaluate-{dataset.lower().replace('_', '-').replace('.', '-')}")
    stores = [scan_store(dataset, s.scan_id, store_root) for s in discover_scans(loaded)]
    ready = [s for s in stores if _predicted(s)]
    if len(ready) < len(stores):
        logger.warning("%d scans have no complete prediction and are skipped", len(stores) - len(ready))
    t0 = time.perf_counter()
    futures = [evaluate_scan_task.submit(s, loaded.entry, log_mlflow) for s in ready]
    wait(futures)
    outcomes = []
    for store, future in zip(ready, futures):
        scan_id = Path(store).name.removesuffix(".zarr")
        if future.state.is_completed():
            metrics, run_id = future.result()
            shown = ", ".join(f"{k}={metrics[k]:.3f}" for k in ("mean_iou", "mean_dice", "ece") if k in metrics)
            outcomes.append(ScanOutcome(dataset, scan_id, "evaluate", "evaluated", store,
                                        shown + (f", MLflow run {run_id}" if run_id else ""),
                                        time.perf_counter() - t0))
        else:
            err = future.state.result(raise_on_failure=False)
            outcomes.append(ScanOutcome(dataset, scan_id, "evaluate", "failed", store, str(err)))
    return final_state(outcomes, key=f"evaluate-{dataset.lower().replace('_', '-').replace('.', '-')}")

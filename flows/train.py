"""The ``train`` flow: bring the dataset's stores up to date, then train, track, register, promote."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from data_catalog import DEFAULT_CATALOG_DIR, find_entry
from flows.ingest import ingest_flow
from tasks.training.data import TrainingError
from tasks.training.train import TrainReport, train_dataset


@task(name="train-model", task_run_name="train {dataset}", cache_policy=NO_CACHE, persist_result=False)
def train_task(dataset: str, catalog: str, architecture: str | None, epochs: int | None,
               max_minutes: float | None, seed: int, store_root: str | None, init_from: str | None = None,
               freeze: str | None = None) -> TrainReport:
    report = train_dataset(find_entry(dataset, Path(catalog)), architecture=architecture, epochs=epochs,
                           max_minutes=max_minutes, seed=seed, store_root=store_root, init_from=init_from,
                           freeze=freeze)
    get_run_logger().info("%s: %s=%.4f after %d epochs (%s); %s", report.registered, report.metric_name,
                          report.metric, report.epochs, report.stopped, report.decision)
    return report


@flow(name="train", flow_run_name="train {dataset}")
def train_flow(dataset: str, catalog: str = str(DEFAULT_CATALOG_DIR), architecture: str | None = None,
               epochs: int | None = None, max_minutes: float | None = None, seed: int = 0,
               store_root: str | None = None, init_from: str | None = None, freeze: str | None = None
               ) -> TrainReport:
    ingest = ingest_flow(dataset, catalog=catalog, store_root=store_root, return_state=True)
    if ingest.is_failed():
        get_run_logger().warning("some scans failed to ingest: %s", ingest.message)
    try:
        return train_task(dataset, catalog, architecture, epochs, max_minutes, seed, store_root, init_from, freeze)
    except TrainingError as exc:
        if ingest.is_failed():  # the reason is usually the ingest failure: say it where it is read
            raise TrainingError(f"{exc} (ingest: {' '.join(ingest.message.split())})") from None
        raise

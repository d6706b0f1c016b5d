"""The ``infer`` flow: the dataset's registered model (or a given one) over every complete scan."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait

from data_catalog import DEFAULT_CATALOG_DIR, find_entry
from data_catalog.schema import CatalogEntry
from flows.ingest import transient_io_error
from flows.outcomes import ScanOutcome, final_state
from tasks import storage
from tasks.engine.infer import EngineConfig, InferResult, infer_scan
from tasks.engine.model_io import load_model
from tasks.ingest import discover_scans
from tasks.settings import scan_store


def engine_config(entry: CatalogEntry) -> EngineConfig:
    t = entry.tiling
    return EngineConfig(tile=tuple(t.tile) if t.tile else None, overlap=t.overlap, blend=t.blend, batch=t.batch,
                        pad=t.pad)


def model_uri(entry: CatalogEntry) -> str | None:
    return f"models:/{entry.model.name}@{entry.model.alias}" if entry.model else None


@task(name="infer-scan", task_run_name="infer {store}", retries=2, retry_delay_seconds=[2, 10],
      retry_condition_fn=transient_io_error, cache_policy=NO_CACHE, persist_result=False)
def infer_scan_task(store: str, uri: str, config: EngineConfig) -> InferResult:
    return infer_scan(store, load_model(uri), config)


@flow(name="infer", flow_run_name="infer {dataset}")
def infer_flow(dataset: str, catalog: str = str(DEFAULT_CATALOG_DIR), model: str | None = None,
               store_root: str | None = None):
    """Run ``model`` (default: the catalog's ``models:/NAME@ALIAS``) over the dataset's complete scans.
    Scans already predicted by the same model version with the same parameters are skipped."""
    logger = get_run_logger()
    loaded = find_entry(dataset, Path(catalog))
    entry = loaded.entry
    uri = model or model_uri(entry)
    if uri is None:
        raise ValueError(f"dataset '{dataset}' names no model in the catalog; pass one")
    stores = [scan_store(dataset, s.scan_id, store_root) for s in discover_scans(loaded)]
    ready = [s for s in stores if storage.is_complete(s)]
    if len(ready) < len(stores):
        logger.warning("%d scans are not ingested (complete) and are skipped", len(stores) - len(ready))
    config = engine_config(entry)
    futures = [infer_scan_task.submit(s, uri, config) for s in ready]
    wait(futures)
    outcomes = []
    for store, future in zip(ready, futures):
        scan_id = Path(store).name.removesuffix(".zarr")
        if future.state.is_completed():
            r = future.result()
            outcomes.append(ScanOutcome(dataset, scan_id, "infer", r.status, store,
                                        f"{uri}, {r.model_calls} tiles" if r.model_calls else uri, r.seconds))
        else:
            err = future.state.result(raise_on_failure=False)
            outcomes.append(ScanOutcome(dataset, scan_id, "infer", "failed", store, str(err)))
    return final_state(outcomes, key=f"infer-{dataset.lower().replace('_', '-').replace('.', '-')}")

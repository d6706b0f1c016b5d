"""The ``ingest`` flow: every scan of one catalog dataset into its Zarr group, one task per scan."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait

from data_catalog import DEFAULT_CATALOG_DIR, find_entry
from flows.outcomes import ScanOutcome, final_state
from tasks.errors import ScanError
from tasks.ingest import IngestResult, ScanSpec, discover_scans, ingest_scan
from tasks.settings import scan_store


def transient_io_error(task, task_run, state) -> bool:
    """Retry only what may pass: I/O and network errors. Bad input (ScanError) fails at once."""
    try:
        state.result()
    except ScanError:
        return False
    except (TimeoutError, ConnectionError, OSError):
        return True
    except BaseException:
        return False
    return False


@task(name="ingest-scan", task_run_name="ingest {spec.scan_id}", retries=2, retry_delay_seconds=[2, 10],
      retry_condition_fn=transient_io_error, cache_policy=NO_CACHE)
def ingest_scan_task(spec: ScanSpec, store: str, force: bool = False) -> IngestResult:
    result = ingest_scan(spec, store, force=force)
    get_run_logger().info("%s: %s %s in %.1f s", spec.scan_id, result.status, result.shape, result.seconds)
    return result


@flow(name="ingest", flow_run_name="ingest {dataset}")
def ingest_flow(dataset: str, catalog: str = str(DEFAULT_CATALOG_DIR), store_root: str | None = None,
                force: bool = False):
    """Ingest every scan the dataset's catalog entry names now; one bad scan fails only itself."""
    logger = get_run_logger()
    specs = discover_scans(find_entry(dataset, Path(catalog)))
    if not specs:
        logger.warning("%s: the catalog's scans.path matches no scan", dataset)
    started = time.perf_counter()
    futures = [ingest_scan_task.submit(s, scan_store(dataset, s.scan_id, store_root), force) for s in specs]
    wait(futures)
    outcomes = []
    for spec, future in zip(specs, futures):
        store = scan_store(dataset, spec.scan_id, store_root)
        state = future.state
        if state.is_completed():
            r = future.result()
            outcomes.append(ScanOutcome(dataset, spec.scan_id, "ingest", r.status, store, seconds=r.seconds))
        else:
            err = state.result(raise_on_failure=False)
            message = str(err) if isinstance(err, BaseException) else (state.message or state.name)
            logger.error("%s: %s", spec.scan_id, message)
            outcomes.append(ScanOutcome(dataset, spec.scan_id, "ingest", "failed", store, message,
                                        time.perf_counter() - started))
    return final_state(outcomes, key=f"ingest-{dataset.lower().replace('_', '-').replace('.', '-')}")

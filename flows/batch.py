"""Scans in batches: a nightly over thousands of scans runs one Prefect task per batch of scans and
step (ingest, infer, and instances -> evaluate -> export), not one per scan and step; the per-scan
work inside is the per-scan tasks' own functions (``.fn``: the same locks, GPU slot and records).

What a batch returns is per scan: ``(True, result)`` or ``(False, one-line error)``; one scan failing
fails only itself, never its batch. A transient I/O error (TimeoutError, ConnectionError, OSError;
never a ScanError: bad input) is retried per scan after 2 then 10 seconds, as the per-scan tasks'
``retries`` do. Each batch task logs one line per scan (Prefect's run logs) and its run name names
its first and last scan; the flow's table artifact has every scan's every step.

Batch size (:func:`batch_size`): ``TILEWISE_BATCH_SCANS`` when set, else about 16 batches per step
(1 scan per batch up to 16 scans: a small catalog's runs look per scan, as before), at most 64.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from data_catalog.schema import CatalogEntry
from tasks.errors import ScanError

BATCH_MAX = 64
BATCHES_PER_STEP = 16
RETRY_DELAYS = (2.0, 10.0)


def batch_size(n: int) -> int:
    """Scans per batch for a step over ``n`` scans (``TILEWISE_BATCH_SCANS`` wins when a positive integer)."""
    try:
        chosen = int(os.environ.get("TILEWISE_BATCH_SCANS", "0"))
    except ValueError:
        chosen = 0
    if chosen > 0:
        return chosen
    return max(1, min(BATCH_MAX, math.ceil(n / BATCHES_PER_STEP)))


def batches(items: list, size: int) -> list[list]:
    return [items[i: i + size] for i in range(0, len(items), size)]


def scan_of(store: str) -> str:
    return Path(str(store).rstrip("/")).name.removesuffix(".zarr")


def span(ids: list[str]) -> str:
    """What a batch's task run is called after: ``a`` or ``a … z (N scans)``."""
    return ids[0] if len(ids) == 1 else f"{ids[0]} … {ids[-1]} ({len(ids)} scans)"


def with_retries(fn: Callable, *args, delays: tuple[float, ...] = RETRY_DELAYS, **kwargs):
    """``fn(*args, **kwargs)``, called again after a transient I/O error (up to ``len(delays)`` times)."""
    for delay in (*delays, None):
        try:
            return fn(*args, **kwargs)
        except ScanError:
            raise
        except (TimeoutError, ConnectionError, OSError):
            if delay is None:
                raise
            time.sleep(delay)


def attempt(fn: Callable, *args, retry: bool = True, **kwargs) -> tuple[bool, object]:
    """``(True, fn(...))``, or ``(False, its error in one line)``; a batch goes on after a failed scan."""
    try:
        return True, (with_retries(fn, *args, **kwargs) if retry else fn(*args, **kwargs))
    except Exception as exc:  # the scan's failure, reported in its row; the batch goes on
        return False, str(exc) or type(exc).__name__


@task(name="ingest-scans", task_run_name="ingest {label}", cache_policy=NO_CACHE, persist_result=False)
def ingest_batch_task(specs: list, stores: list[str], force: bool = False, label: str = "") -> list:
    """Each scan of ``specs`` into its store (flows/ingest.py's per-scan task function)."""
    from flows.ingest import ingest_scan_task

    return [attempt(ingest_scan_task.fn, spec, store, force) for spec, store in zip(specs, stores)]


@task(name="infer-scans", task_run_name="infer {label}", cache_policy=NO_CACHE, persist_result=False)
def infer_batch_task(stores: list[str], uri: str, config, dask: str | None = None, replace: bool = False,
                     label: str = "") -> list:
    """``uri`` over each store (flows/infer.py's per-scan task function: GPU slot, store lock, resume)."""
    from flows.infer import infer_scan_task

    logger = get_run_logger()
    out = []
    for store in stores:
        ok, value = attempt(infer_scan_task.fn, store, uri, config, dask, replace)
        logger.info("%s: %s", scan_of(store), value.status if ok else f"failed: {value}")
        out.append((ok, value))
    return out


def evaluation_is_current(store: str, entry: CatalogEntry) -> bool:
    """The prediction's recorded evaluation scored this very prediction against the store's
    reference with the catalog's current scoring settings (tasks/identity.py)."""
    from tasks import identity, storage

    record = storage.read_record(f"{store}/prediction") or {}
    return identity.evaluation_current(record, storage.REFERENCE, identity.scoring_settings(entry))


def stored_metrics(store: str) -> dict:
    from tasks import storage
    from tasks.metrics.evaluate import EvaluationReport

    evaluation = (storage.read_record(f"{store}/prediction") or {}).get("evaluation") or {}
    try:
        return EvaluationReport(**evaluation).flat_metrics()
    except (TypeError, KeyError, ValueError):
        return {}


def evaluate_step(store: str, entry: CatalogEntry, parent_run_id: str | None = None,
                  force: bool = False) -> tuple[str, dict, str | None]:
    """(status, flat metrics, MLflow run id or None): ``unchanged`` with the stored metrics when the
    last evaluation scored this prediction already, else evaluated; pictures always drawn under
    ``reports/``, an MLflow run of its own only with the catalog's ``reports: {per_scan: true}``."""
    if not force and evaluation_is_current(store, entry):
        return "unchanged", stored_metrics(store), None
    from tasks.reports import evaluate_and_report

    report, _, run_id = evaluate_and_report(store, entry=entry, log_mlflow=entry.reports.per_scan,
                                            parent_run_id=parent_run_id)
    return "evaluated", report.flat_metrics(), run_id


@task(name="evaluate-export-scans", task_run_name="instances, evaluate, export {label}", cache_policy=NO_CACHE,
      persist_result=False)
def after_infer_batch_task(stores: list[str], entry: CatalogEntry, settings, detector: bool,
                           exports: list[tuple], parent_run_id: str | None = None, force: bool = False,
                           label: str = "") -> list[dict]:
    """Per store, in order: instances (the catalog's, or a detector's), evaluate (where labels
    exist), export, instance polygons. ``exports``: per store, (labels ExportOptions or None,
    polygons ExportOptions or None). Returns per store ``{step: (ok, result, seconds)}`` and
    ``model`` (the prediction's model version)."""
    from flows.export import export_scan_task
    from flows.instances import instances_scan_task
    from tasks import storage

    logger = get_run_logger()
    per_scan = entry.reports.per_scan
    out = []
    for store, (labels_export, polygons_export) in zip(stores, exports):
        row: dict = {"model": str((storage.read_record(f"{store}/prediction") or {}).get("model", ""))}

        def timed(step, fn, *args, retry=False):
            t0 = time.perf_counter()
            ok, value = attempt(fn, *args, retry=retry)
            row[step] = (ok, value, time.perf_counter() - t0)
            return ok

        instances_ok = None
        if settings is not None or detector:
            instances_ok = timed("instances", instances_scan_task.fn, store, entry, settings, parent_run_id, force,
                                 per_scan)
        if entry.labels is not None:
            timed("evaluate", evaluate_step, store, entry, parent_run_id, force)
        if labels_export is not None:
            timed("export", export_scan_task.fn, store, labels_export, retry=True)
        if polygons_export is not None and instances_ok:
            timed("polygons", export_scan_task.fn, store, polygons_export, retry=True)
        elif polygons_export is not None:
            row["polygons"] = (False, "instance polygons: the instances step failed", 0.0)
        logger.info("%s: %s", scan_of(store), ", ".join(
            f"{step} {'failed' if not v[0] else _status(v[1])}" for step, v in row.items() if step != "model"))
        out.append(row)
    return out


def _status(result) -> str:
    if isinstance(result, tuple):  # evaluate: (status, metrics, run id)
        return result[0]
    if isinstance(result, dict):  # instances
        return str(result.get("status", ""))
    return str(getattr(result, "status", ""))

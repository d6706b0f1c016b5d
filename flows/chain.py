"""The chain every scan of a nightly or backfill run goes through, one dataset at a time:

    ingest -> infer (the dataset's model version, its calibrator applied per chunk; an instance
    model runs tile by tile) -> instances (the catalog's ``instances`` section: components or
    watershed of the prediction; the panoptic output; an MLflow run with the instance table) ->
    evaluate (where labels exist) -> export (the catalog's format)

Work is decided from content, never from paths or times: ingest compares the sources' sha256 and
options with the store's record, infer the prediction's digest (model version, calibrator,
parameters), evaluate the digest its last evaluation recorded, export the export's sidecar. A step
whose output is up to date reports ``unchanged`` and computes nothing.

The model alias (``models:/NAME@champion``) is resolved once per dataset per run, before any scan
is inferred: every scan of the run gets the same ``models:/NAME/VERSION``, whatever is promoted
meanwhile. A dataset with labels and no registered model trains one first (its catalog budget).

One scan failing a step stops only that scan's later steps; the other scans and datasets go on.

Scans go through in batches (flows/batch.py): a Prefect task per batch and step, about 16 per step
whatever the number of scans, so thousands of scans are not thousands of task runs; every scan
keeps its own row per step in the summary, the table artifact and MLflow's table.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from prefect import get_run_logger

from data_catalog import LoadedEntry
from data_catalog.schema import CatalogEntry
from flows import summary
from flows.batch import (after_infer_batch_task, batch_size, batches, evaluation_is_current,  # noqa: F401
                         infer_batch_task,
                         ingest_batch_task, span)
from flows.export import export_path
from flows.infer import engine_config, model_uri, resolve_version
from flows.instances import instance_settings, outcome_row
from flows.outcomes import ScanOutcome, plan, report
from models.zoo import is_instance_architecture
from tasks import storage
from tasks.export import ExportOptions
from tasks.ingest import ScanSpec
from tasks.settings import scan_store

REFERENCE = storage.REFERENCE  # what evaluations record as the store's reference
INFER_AHEAD = 2  # infer batches submitted at a time


@dataclass(frozen=True)
class ChainOptions:
    """``force``: recompute every step of the selected scans (re-ingest, re-infer, re-evaluate,
    re-export). ``infer=False``: ingest (and train a missing model, unless ``train_missing`` is
    False) but run no model. ``dask``: the engine's regions on that cluster (else the catalog's
    ``tiling.dask``). ``kind``: nightly | backfill (names the MLflow run)."""

    force: bool = False
    infer: bool = True
    train_missing: bool = True
    dask: str | None = None
    kind: str = "nightly"


def _error(state) -> str:
    err = state.result(raise_on_failure=False)
    return str(err) if isinstance(err, BaseException) else (state.message or state.name)


def _ensure_model(loaded: LoadedEntry, catalog: str, store_root: str | None, options: ChainOptions,
                  logger) -> tuple[str | None, list[ScanOutcome]]:
    """The dataset's model version URI (resolved once), training one first when none is registered,
    the dataset has labels and training is allowed; with the outcome rows that say what happened."""
    from flows.train import train_flow

    entry = loaded.entry
    alias = model_uri(entry)
    if alias is None:
        return None, [ScanOutcome(entry.name, "*", "infer", "skipped", message="the catalog names no model")]
    version = resolve_version(alias)
    if version is not None:
        return version, []
    if not (options.train_missing and entry.labels is not None):
        why = "no labels to train on" if entry.labels is None else "training disabled (--no-train)"
        return None, [ScanOutcome(entry.name, "*", "infer", "skipped",
                                  message=f"no model at {alias} ({why}); run: tilewise train {entry.name}")]
    t = entry.training
    state = train_flow(entry.name, catalog=catalog, architecture=entry.model.architecture, epochs=t.epochs,
                       max_minutes=t.max_minutes, store_root=store_root, return_state=True)
    report = state.result(raise_on_failure=False)
    if isinstance(report, BaseException):
        logger.error("%s: training failed: %s", entry.name, report)
        return None, [ScanOutcome(entry.name, "*", "train", "failed", message=str(report))]
    version = resolve_version(alias)
    row = ScanOutcome(entry.name, "*", "train", "trained", message=f"{report.registered}: {report.decision}; "
                      f"calibration: {report.calibration}" + (f"; watershed: {report.watershed}" if report.watershed
                                                               else ""), seconds=report.seconds, model=version or "")
    if version is None and report.alias == "challenger":  # the first version, refused (one class everywhere...)
        return None, [row, ScanOutcome(entry.name, "*", "infer", "skipped",
                                       message=f"no model at {alias}: {report.registered} was {report.decision}; "
                                               f"train longer: tilewise train {entry.name} --max-minutes N")]
    if version is None:  # trained and promoted, yet the alias does not resolve (the registry changed under us)
        return None, [row, ScanOutcome(entry.name, "*", "infer", "failed",
                                       message=f"trained {report.registered} but {alias} does not resolve")]
    return version, [row]


def _kept(store: str, version: str, entry: CatalogEntry) -> str | None:
    """With ``reprocess_on_new_champion: false``: the older version whose complete prediction is kept."""
    if getattr(entry.model, "reprocess_on_new_champion", True):
        return None
    record = storage.read_record(f"{store}/prediction") or {}
    if not record.get(storage.COMPLETE_KEY):
        return None
    model = str(record.get("model", ""))
    name = version.rsplit("/", 1)[0]
    return model if model != version and model.startswith(name + "/") else None


def _ingest(entry: CatalogEntry, specs: list[ScanSpec], store_root: str | None, options: ChainOptions,
            logger) -> tuple[list[ScanOutcome], list[str]]:
    stores = [scan_store(entry.name, s.scan_id, store_root) for s in specs]
    size = batch_size(len(specs))
    futures = [(part, stores[i: i + size], ingest_batch_task.submit(part, stores[i: i + size], options.force,
                                                                     label=span([s.scan_id for s in part])))
               for i, part in zip(range(0, len(specs), size), batches(specs, size))]
    rows, ok = [], []
    for part, part_stores, future in futures:
        future.wait()
        results = future.result() if future.state.is_completed() else [(False, _error(future.state))] * len(part)
        for spec, store, (good, r) in zip(part, part_stores, results):
            if good:
                rows.append(report(ScanOutcome(entry.name, spec.scan_id, "ingest", r.status, store, seconds=r.seconds,
                                               output=store)))
                ok.append(spec.scan_id)
            else:
                logger.error("%s/%s: ingest failed: %s", entry.name, spec.scan_id, r)
                rows.append(report(ScanOutcome(entry.name, spec.scan_id, "ingest", "failed", store, r)))
    return rows, ok


def _predict_evaluate_export(entry: CatalogEntry, scan_ids: list[str], version: str, store_root: str | None,
                             options: ChainOptions, parent_run_id: str | None, logger) -> list[ScanOutcome]:
    """Infer in batches (all submitted; the GPU slot runs them one at a time), and as each infer
    batch ends, its scans' instances, evaluation and export as one batch, while the next infers."""
    name = entry.name
    config = engine_config(entry)
    dask = options.dask or getattr(entry.tiling, "dask", None)
    fmt = entry.export.format if entry.export else None
    settings = instance_settings(entry)
    detector = entry.model is not None and is_instance_architecture(entry.model.architecture)
    polygons_kind = entry.export.instances if (entry.export is not None and (settings is not None or detector)) \
        else None
    rows: list[ScanOutcome] = []
    stores = {scan_id: scan_store(name, scan_id, store_root) for scan_id in scan_ids}
    to_infer = []
    for scan_id in scan_ids:
        store = stores[scan_id]
        kept = None if options.force else _kept(store, version, entry)
        if kept:
            rows.append(report(ScanOutcome(name, scan_id, "infer", "kept", store, model=kept,
                                           output=f"{store}/prediction",
                                           message=f"predicted by {kept}; reprocess_on_new_champion is false")))
        else:
            to_infer.append(scan_id)
    size = batch_size(len(scan_ids))
    inferring = set(to_infer)
    kept_ids = [s for s in scan_ids if s not in inferring]
    # Infer batches go in two at a time (one on the GPU slot, the next waiting for it): submitted all
    # at once they filled the task runner's threads, and no evaluation could start before the last
    # inference (5,000 scans: 7 minutes of inference, then 40 of evaluation, one after the other).
    waiting = iter(batches(to_infer, size))
    infers: deque = deque()

    def infer_next() -> None:
        part = next(waiting, None)
        if part is not None:
            infers.append((part, infer_batch_task.submit([stores[s] for s in part], version, config, dask,
                                                         options.force, label=span(part))))

    for _ in range(INFER_AHEAD):
        infer_next()
    afters = []

    def after(part: list[str]):
        exports = [(ExportOptions(fmt, export_path(name, s, fmt), force=options.force) if fmt else None,
                    ExportOptions(polygons_kind, export_path(name, s, polygons_kind, what="instances"),
                                  what="instances", force=options.force) if polygons_kind else None)
                   for s in part]
        afters.append((part, after_infer_batch_task.submit([stores[s] for s in part], entry, settings, detector,
                                                           exports, parent_run_id, options.force,
                                                           label=span(part))))

    for part in batches(kept_ids, size):
        after(part)
    while infers:  # in order: batch 1 is evaluated while batch 2 is inferred
        part, future = infers.popleft()
        future.wait()
        infer_next()
        results = future.result() if future.state.is_completed() else [(False, _error(future.state))] * len(part)
        inferred = []
        for scan_id, (good, r) in zip(part, results):
            store = stores[scan_id]
            if not good:
                logger.error("%s/%s: infer failed: %s", name, scan_id, r)
                rows.append(report(ScanOutcome(name, scan_id, "infer", "failed", store, r, model=version)))
                continue
            note = f"{r.model_calls} model calls over {r.tiles} tiles" if r.model_calls else "prediction up to date"
            rows.append(report(ScanOutcome(name, scan_id, "infer", r.status, store, note, r.seconds, model=version,
                                           output=f"{store}/prediction")))
            inferred.append(scan_id)
        if inferred:
            after(inferred)
    for part, future in afters:
        future.wait()
        steps = [step for step, wanted in (("instances", settings is not None or detector),
                                           ("evaluate", entry.labels is not None), ("export", fmt is not None),
                                           ("polygons", polygons_kind is not None)) if wanted]
        results = future.result() if future.state.is_completed() else \
            [{step: (False, _error(future.state), 0.0) for step in steps}] * len(part)
        for scan_id, got in zip(part, results):
            rows += [report(r) for r in _after_rows(entry, scan_id, stores[scan_id], got, version, fmt, polygons_kind)]
    return rows


def _after_rows(entry: CatalogEntry, scan_id: str, store: str, got: dict, version: str, fmt: str | None,
                polygons_kind: str | None) -> list[ScanOutcome]:
    """The outcome rows of one scan's instances, evaluate and export (what after_infer_batch_task returned)."""
    name = entry.name
    model = got.get("model") or version
    rows = []
    if "instances" in got:
        good, r, _ = got["instances"]
        rows.append(outcome_row(name, scan_id, store, r, model=model) if good else
                    ScanOutcome(name, scan_id, "instances", "failed", store, r, model=model))
    if entry.labels is None:
        rows.append(ScanOutcome(name, scan_id, "evaluate", "skipped", store, "no labels in the catalog", model=model))
    else:
        good, r, seconds = got["evaluate"]
        if good:
            status, metrics, run_id = r
            rows.append(ScanOutcome(name, scan_id, "evaluate", status, store,
                                    f"MLflow run {run_id}" if run_id else
                                    "evaluation up to date" if status == "unchanged" else "evaluated",
                                    seconds, model=model, metrics=metrics))
        else:
            rows.append(ScanOutcome(name, scan_id, "evaluate", "failed", store, r, model=model))
    if polygons_kind is not None:
        good, r, _ = got["polygons"]
        rows.append(ScanOutcome(name, scan_id, "export", r.status, store, "instance polygons", seconds=r.seconds,
                                model=model, output=r.out) if good else
                    ScanOutcome(name, scan_id, "export", "failed", store,
                                r if str(r).startswith("instance polygons") else f"instance polygons: {r}",
                                model=model))
    if fmt is None:
        rows.append(ScanOutcome(name, scan_id, "export", "skipped", store, "no export format in the catalog",
                                model=model))
    else:
        good, r, _ = got["export"]
        rows.append(ScanOutcome(name, scan_id, "export", r.status, store, seconds=r.seconds, model=model, output=r.out)
                    if good else ScanOutcome(name, scan_id, "export", "failed", store, r, model=model))
    return rows


def _steps(entry: CatalogEntry, options: ChainOptions) -> list[str]:
    """The per-scan steps a run of ``entry`` goes through (what its progress counts)."""
    steps = ["ingest"]
    if options.infer and entry.model is not None:
        steps.append("infer")
        if instance_settings(entry) is not None or is_instance_architecture(entry.model.architecture):
            steps.append("instances")
        steps += ["evaluate", "export"]
        if entry.export is not None and entry.export.instances:
            steps.append("export")  # the instance polygons: a second export per scan
    return steps


def run_dataset(loaded: LoadedEntry, specs: list[ScanSpec], catalog: str, store_root: str | None,
                options: ChainOptions) -> list[ScanOutcome]:
    """Every scan of ``specs`` (scans of ``loaded``) through the chain; the dataset's run summary
    in MLflow (the per-scan evaluate runs nested under it)."""
    logger = get_run_logger()
    entry = loaded.entry
    started = time.perf_counter()
    parent = summary.start_mlflow_run(entry.name, options.kind, logger, entry.description)
    rows: list[ScanOutcome] = []
    version = None
    try:
        plan(entry.name, len(specs), _steps(entry, options))
        ingest_rows, ok = _ingest(entry, specs, store_root, options, logger)
        rows += ingest_rows
        if entry.model is not None and (options.infer or options.train_missing):
            version, model_rows = _ensure_model(loaded, catalog, store_root, options, logger)
            rows += [report(r) for r in model_rows]
        if options.infer and version is not None and ok:
            logger.info("%s: %d scans with %s", entry.name, len(ok), version)
            rows += _predict_evaluate_export(entry, ok, version, store_root, options, parent, logger)
    except Exception as exc:  # the registry or the store unreachable: this dataset fails, the next one runs
        logger.error("%s: %s: %s", entry.name, type(exc).__name__, exc)
        rows.append(report(ScanOutcome(entry.name, "*", "run", "failed", message=f"{type(exc).__name__}: {exc}")))
    finally:
        summary.finish_mlflow_run(parent, rows, version, time.perf_counter() - started, logger)
    return rows

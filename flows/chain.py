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
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prefect import allow_failure, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait

from data_catalog import LoadedEntry
from data_catalog.schema import CatalogEntry
from flows import summary
from flows.export import export_path, export_scan_task
from flows.infer import engine_config, infer_scan_task, model_uri, resolve_version
from flows.instances import instance_settings, instances_scan_task, outcome_row
from flows.ingest import ingest_scan_task
from flows.outcomes import ScanOutcome, plan, report
from models.zoo import is_instance_architecture
from tasks import identity, storage
from tasks.export import ExportOptions
from tasks.ingest import ScanSpec
from tasks.settings import scan_store

REFERENCE = storage.REFERENCE  # what evaluations record as the store's reference


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


def evaluation_is_current(store: str, entry: CatalogEntry) -> bool:
    """The prediction's recorded evaluation scored this very prediction against the store's
    reference with the catalog's current scoring settings (tasks/identity.py)."""
    record = storage.read_record(f"{store}/prediction") or {}
    return identity.evaluation_current(record, REFERENCE, identity.scoring_settings(entry))


def _stored_metrics(store: str) -> dict:
    from tasks.metrics.evaluate import EvaluationReport

    evaluation = (storage.read_record(f"{store}/prediction") or {}).get("evaluation") or {}
    try:
        return EvaluationReport(**evaluation).flat_metrics()
    except (TypeError, KeyError, ValueError):
        return {}


@task(name="evaluate-step", task_run_name="evaluate {store}", cache_policy=NO_CACHE, persist_result=False)
def evaluate_step_task(store: str, entry: CatalogEntry, parent_run_id: str | None = None,
                       force: bool = False) -> tuple[str, dict, str | None]:
    """(status, flat metrics, MLflow run id): ``unchanged`` with the stored metrics when the last
    evaluation scored this prediction already, else evaluated and logged (nested under the run's
    MLflow run of the dataset)."""
    if not force and evaluation_is_current(store, entry):
        return "unchanged", _stored_metrics(store), None
    from tasks.reports import evaluate_and_report

    report, _, run_id = evaluate_and_report(store, entry=entry, log_mlflow=True, parent_run_id=parent_run_id)
    return "evaluated", report.flat_metrics(), run_id


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
    stores = {s.scan_id: scan_store(entry.name, s.scan_id, store_root) for s in specs}
    futures = [ingest_scan_task.submit(s, stores[s.scan_id], options.force) for s in specs]
    wait(futures)
    rows, ok = [], []
    for spec, future in zip(specs, futures):
        store = stores[spec.scan_id]
        if future.state.is_completed():
            r = future.result()
            rows.append(report(ScanOutcome(entry.name, spec.scan_id, "ingest", r.status, store, seconds=r.seconds,
                                    output=store)))
            ok.append(spec.scan_id)
        else:
            message = _error(future.state)
            logger.error("%s/%s: ingest failed: %s", entry.name, spec.scan_id, message)
            rows.append(report(ScanOutcome(entry.name, spec.scan_id, "ingest", "failed", store, message)))
    return rows, ok


def _predict_evaluate_export(entry: CatalogEntry, scan_ids: list[str], version: str, store_root: str | None,
                             options: ChainOptions, parent_run_id: str | None, logger) -> list[ScanOutcome]:
    name = entry.name
    config = engine_config(entry)
    dask = options.dask or getattr(entry.tiling, "dask", None)
    fmt = entry.export.format if entry.export else None
    settings = instance_settings(entry)
    detector = entry.model is not None and is_instance_architecture(entry.model.architecture)
    rows: list[ScanOutcome] = []
    infers = {}
    later_polygons: dict = {}
    for scan_id in scan_ids:
        store = scan_store(name, scan_id, store_root)
        kept = None if options.force else _kept(store, version, entry)
        if kept:
            rows.append(report(ScanOutcome(name, scan_id, "infer", "kept", store, model=kept, output=f"{store}/prediction",
                                    message=f"predicted by {kept}; reprocess_on_new_champion is false")))
            infers[scan_id] = None
        else:
            infers[scan_id] = infer_scan_task.submit(store, version, config, dask, options.force)
    later = []
    for scan_id, future in infers.items():  # in order: scan 1 is evaluated while scan 2 is inferred
        store = scan_store(name, scan_id, store_root)
        if future is not None:
            future.wait()
            if not future.state.is_completed():
                message = _error(future.state)
                logger.error("%s/%s: infer failed: %s", name, scan_id, message)
                rows.append(report(ScanOutcome(name, scan_id, "infer", "failed", store, message, model=version)))
                continue
            r = future.result()
            note = f"{r.model_calls} model calls over {r.tiles} tiles" if r.model_calls else "prediction up to date"
            rows.append(report(ScanOutcome(name, scan_id, "infer", r.status, store, note, r.seconds, model=version,
                                    output=f"{store}/prediction")))
        instances = None
        if settings is not None or detector:
            instances = instances_scan_task.submit(store, entry, settings, parent_run_id, options.force)
        evaluation = None
        if entry.labels is not None:
            evaluation = evaluate_step_task.submit(store, entry, parent_run_id, options.force,
                                                   wait_for=[allow_failure(instances)] if instances is not None else None)
        export = None
        if fmt is not None:
            export = export_scan_task.submit(store, ExportOptions(fmt, export_path(name, scan_id, fmt),
                                                                  force=options.force),
                                             wait_for=[allow_failure(evaluation)] if evaluation is not None else None)
        polygons = None
        if instances is not None and entry.export is not None and entry.export.instances:
            kind = entry.export.instances
            polygons = export_scan_task.submit(store, ExportOptions(kind, export_path(name, scan_id, kind,
                                                                                      what="instances"),
                                                                    what="instances", force=options.force),
                                               wait_for=[instances])
        later.append((scan_id, store, instances, evaluation, export, time.perf_counter()))
        if polygons is not None:
            later_polygons[scan_id] = polygons
    for scan_id, store, instances, evaluation, export, t0 in later:
        model = str((storage.read_record(f"{store}/prediction") or {}).get("model", version))
        if instances is not None:
            instances.wait()
            if instances.state.is_completed():
                rows.append(report(outcome_row(name, scan_id, store, instances.result(), model=model)))
            else:
                rows.append(report(ScanOutcome(name, scan_id, "instances", "failed", store, _error(instances.state),
                                        model=model)))
        if evaluation is None:
            rows.append(report(ScanOutcome(name, scan_id, "evaluate", "skipped", store, "no labels in the catalog",
                                    model=model)))
        else:
            evaluation.wait()
            if evaluation.state.is_completed():
                status, metrics, run_id = evaluation.result()
                rows.append(report(ScanOutcome(name, scan_id, "evaluate", status, store,
                                        f"MLflow run {run_id}" if run_id else "evaluation up to date",
                                        time.perf_counter() - t0, model=model, metrics=metrics)))
            else:
                rows.append(report(ScanOutcome(name, scan_id, "evaluate", "failed", store, _error(evaluation.state),
                                        model=model)))
        polygons = later_polygons.get(scan_id)
        if polygons is not None:
            polygons.wait()
            if polygons.state.is_completed():
                r = polygons.result()
                rows.append(report(ScanOutcome(name, scan_id, "export", r.status, store, "instance polygons",
                                        seconds=r.seconds, model=model, output=r.out)))
            else:
                rows.append(report(ScanOutcome(name, scan_id, "export", "failed", store,
                                        f"instance polygons: {_error(polygons.state)}", model=model)))
        if export is None:
            rows.append(report(ScanOutcome(name, scan_id, "export", "skipped", store, "no export format in the catalog",
                                    model=model)))
            continue
        export.wait()
        if export.state.is_completed():
            r = export.result()
            rows.append(report(ScanOutcome(name, scan_id, "export", r.status, store, seconds=r.seconds, model=model,
                                    output=r.out)))
        else:
            rows.append(report(ScanOutcome(name, scan_id, "export", "failed", store, _error(export.state), model=model)))
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

"""The ``instances`` flow: objects out of each scan's semantic prediction (the catalog's
``instances`` section: connected components or, for EM, a seeded watershed of the membrane
probability), the panoptic output where the dataset has stuff and thing classes, and an MLflow run
per scan with the instance table. A prediction made by an instance model (Mask R-CNN, ``tilewise
infer``) has its instances already: the step only records them (once).

Work is decided from digests, as everywhere (tasks/instances/store.py): instances made from this
very prediction with these parameters are ``unchanged``. Every read of the store holds its lock
shared and every write the writer's (tasks/store_lock.py); what the MLflow run names is checked to
be what it read."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait

from data_catalog import DEFAULT_CATALOG_DIR, find_entry
from data_catalog.schema import CatalogEntry
from flows.outcomes import ScanOutcome, final_state
from tasks import identity, storage
from tasks.ingest import discover_scans
from tasks.instances.tuning import watershed_values
from tasks.settings import scan_store


@dataclass(frozen=True)
class InstanceSettings:
    method: str  # components | watershed
    classes: list[str] | None
    min_size: int
    membrane_class: str | None
    stuff_classes: list[str] | None
    median: int | None = 0  # watershed: median filter of the membrane probability first (None: tuned)
    seed_threshold: float | None = 0.3  # watershed: seeds below it (None: the model version's tuned value)


def instance_settings(entry: CatalogEntry, method: str | None = None, min_size: int | None = None
                      ) -> InstanceSettings | None:
    """The catalog's ``instances`` section (overridden by ``method`` / ``min_size``), None when the
    dataset asks for no instances from its semantic prediction."""
    inst = entry.instances
    chosen = method or (inst.method if inst else None)
    if chosen in (None, "none"):
        return None
    labels = entry.labels
    return InstanceSettings(
        method=chosen,
        classes=(inst.classes if inst and inst.classes else None) or (labels.instance_classes if labels else None),
        min_size=min_size or (inst.min_size if inst else 16),
        membrane_class=(inst.membrane_class if inst else None) or (labels.boundary_class if labels else None),
        stuff_classes=labels.stuff_classes if labels else None,
        median=inst.median if inst else None, seed_threshold=inst.seed_threshold if inst else None)


def made_by_detector(store: str) -> bool:
    """The prediction came from an instance model: its instances are the model's own."""
    return (storage.read_record(f"{store}/prediction") or {}).get("mode") == "instances"


@task(name="instances-scan", task_run_name="instances {store}", cache_policy=NO_CACHE, persist_result=False)
def instances_scan_task(store: str, entry: CatalogEntry, settings: InstanceSettings | None,
                        parent_run_id: str | None = None, force: bool = False, log_mlflow: bool = True) -> dict:
    """Instances of one scan (status computed | unchanged | recorded), the panoptic output where
    the dataset has stuff classes, and the scan's MLflow instances run (once per instances digest)."""
    from tasks.instances import store as inst_store

    t0 = time.perf_counter()
    if made_by_detector(store):
        outcome = {"status": "unchanged", "method": "detector",
                   "count": ((inst_store.read_instances_record(store) or {}).get(storage.COMPLETE_KEY) or {}
                             ).get("count")}
    else:
        if settings is None:
            return {"status": "skipped", "message": "the catalog asks for no instances"}
        from tasks.instances.from_semantic import instances_from_prediction

        if force:
            with storage.store_lock(store, purpose="instances"):
                inst_store.clear_instances(store)
        model = str((storage.read_record(f"{store}/prediction") or {}).get("model", ""))
        seed_threshold, median = watershed_values(settings.seed_threshold, settings.median, model)
        outcome = dict(instances_from_prediction(
            store, method=settings.method, classes=settings.classes, min_size=settings.min_size,
            membrane_class=settings.membrane_class, seed_threshold=seed_threshold, median=median))
    record = inst_store.read_instances_record(store) or {}
    classes = list((storage.read_record(f"{store}/prediction") or {}).get("classes") or [])
    if outcome.get("method") == "detector":  # every class of an instance model but background
        things = list(range(1, len(classes)))
    else:
        things = [classes.index(c) for c in (settings.classes or []) if c in classes]
    stuff = [classes.index(c) for c in (settings.stuff_classes if settings and settings.stuff_classes else [])
             if c in classes]
    wanted = identity.panoptic_record(record.get("digest"), things, stuff) if stuff and things else None
    if wanted != identity.panoptic_record_of(record.get("panoptic")):
        with storage.store_lock(store, purpose="instances"):
            inst_store.update_record(store, {"panoptic": None})  # its record goes before its array is touched
            if wanted is None:  # the catalog no longer asks for it: no stale panoptic output stays
                storage.remove(f"{inst_store.prediction_url(store)}/{inst_store.PANOPTIC}")
            else:
                from tasks.instances.panoptic import write_panoptic

                outcome["panoptic"] = write_panoptic(store, things, stuff)
            record = inst_store.update_record(store, {"panoptic": wanted})
        outcome["status"] = "computed" if outcome["status"] == "unchanged" else outcome["status"]
    if log_mlflow and (outcome["status"] != "unchanged" or record.get("mlflow_run_for") != record.get("digest")):
        from tasks.reports.instances_run import log_instances

        pred_url = f"{store}/prediction"
        with storage.store_lock(store, purpose="instances", shared=True):  # the table it logs is read whole
            read = storage.marks(storage.read_record(pred_url))
            record = inst_store.read_instances_record(store) or {}
            run_id = log_instances(store, entry.name, outcome, parent_run_id)
        with storage.store_lock(store, purpose="instances", brief=True):
            storage.check_marks(pred_url, read, "logged to MLflow")  # the run logged these very instances
            inst_store.update_record(store, {"mlflow_run": run_id, "mlflow_run_for": record.get("digest")})
        outcome["mlflow_run"] = run_id
        if outcome["status"] == "unchanged":
            outcome["status"] = "recorded"
    outcome["seconds"] = time.perf_counter() - t0
    return outcome


def outcome_row(dataset: str, scan_id: str, store: str, result: dict, model: str = "") -> ScanOutcome:
    count = result.get("count")
    note = result.get("message") or f"{count if count is not None else '?'} instances ({result.get('method', '?')})"
    if result.get("mlflow_run"):
        note += f", MLflow run {result['mlflow_run']}"
    return ScanOutcome(dataset, scan_id, "instances", result["status"], store, note, result.get("seconds", 0.0),
                       model=model, output=f"{store}/prediction/instances" if result["status"] != "skipped" else "")


@flow(name="instances", flow_run_name="instances {dataset}")
def instances_flow(dataset: str, catalog: str = str(DEFAULT_CATALOG_DIR), store_root: str | None = None,
                   method: str | None = None, min_size: int | None = None, force: bool = False,
                   log_mlflow: bool = True):
    """Instances of every scan of ``dataset`` with a complete prediction; the others are skipped.
    One failing scan does not stop the others; the flow ends Failed naming each failure."""
    logger = get_run_logger()
    loaded = find_entry(dataset, Path(catalog))
    settings = instance_settings(loaded.entry, method, min_size)
    stores = [scan_store(dataset, s.scan_id, store_root) for s in discover_scans(loaded)]
    ready = [s for s in stores if storage.is_complete(s) and storage.is_complete(f"{s}/prediction")]
    if len(ready) < len(stores):
        logger.warning("%d scans have no complete prediction and are skipped", len(stores) - len(ready))
    if settings is None and not any(made_by_detector(s) for s in ready):
        raise ValueError(f"dataset '{dataset}' asks for no instances (catalog 'instances' section); "
                         "pass --method components or --method watershed")
    futures = [instances_scan_task.submit(s, loaded.entry, settings, None, force, log_mlflow) for s in ready]
    wait(futures)
    outcomes = []
    for store, future in zip(ready, futures):
        scan_id = Path(store).name.removesuffix(".zarr")
        if future.state.is_completed():
            outcomes.append(outcome_row(dataset, scan_id, store, future.result()))
        else:
            err = future.state.result(raise_on_failure=False)
            outcomes.append(ScanOutcome(dataset, scan_id, "instances", "failed", store, str(err)))
    return final_state(outcomes, key=f"instances-{dataset.lower().replace('_', '-').replace('.', '-')}")

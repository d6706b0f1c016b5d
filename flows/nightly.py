"""The ``nightly`` flow: every catalog dataset, every new or changed scan, through every step.

Steps today: ingest → (train, once, when the dataset has labels but no champion model yet) →
infer with the champion. Each step of each dataset is its own subflow, so one failure is visible
on its own and never stops the next dataset; the run ends Failed naming every failed scan.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from data_catalog import DEFAULT_CATALOG_DIR, LoadedEntry, load_catalog
from flows.infer import infer_flow, model_uri
from flows.ingest import ingest_flow
from flows.outcomes import ScanOutcome, final_state
from flows.train import train_flow


def _has_model(uri: str) -> bool:
    from models.registry import RegistryError, describe

    try:
        describe(uri)
        return True
    except RegistryError:
        return False


def _rows(state, dataset: str, step: str) -> list[ScanOutcome]:
    result = state.result(raise_on_failure=False)
    if isinstance(result, list):
        return result
    return [ScanOutcome(dataset, "*", step, "failed", message=str(result))]


def _ensure_model(loaded: LoadedEntry, catalog: str, store_root: str | None, train_missing: bool,
                  logger) -> ScanOutcome | None:
    entry = loaded.entry
    uri = model_uri(entry)
    if uri is None or _has_model(uri):
        return None
    if not (train_missing and entry.labels is not None):
        return ScanOutcome(entry.name, "*", "infer", "skipped",
                           message=f"no model at {uri}; run: tilewise train {entry.name}")
    t = entry.training
    state = train_flow(entry.name, catalog=catalog, architecture=entry.model.architecture, epochs=t.epochs,
                       max_minutes=t.max_minutes, store_root=store_root, return_state=True)
    report = state.result(raise_on_failure=False)
    if isinstance(report, BaseException):
        logger.error("%s: training failed: %s", entry.name, report)
        return ScanOutcome(entry.name, "*", "train", "failed", message=str(report))
    return ScanOutcome(entry.name, "*", "train", "trained", message=f"{report.registered}: {report.decision}",
                       seconds=report.seconds)


@flow(name="nightly")
def nightly_flow(catalog: str = str(DEFAULT_CATALOG_DIR), datasets: list[str] | None = None,
                 store_root: str | None = None, force: bool = False, infer: bool = True,
                 train_missing: bool = True):
    logger = get_run_logger()
    entries = [e for e in load_catalog(Path(catalog)) if not datasets or e.entry.name in datasets]
    outcomes: list[ScanOutcome] = []
    for loaded in entries:
        name = loaded.entry.name
        outcomes += _rows(ingest_flow(name, catalog=catalog, store_root=store_root, force=force,
                                      return_state=True), name, "ingest")
        if not infer or loaded.entry.model is None:
            continue
        trained = _ensure_model(loaded, catalog, store_root, train_missing, logger)
        if trained is not None:
            outcomes.append(trained)
            if trained.status != "trained":
                continue
        outcomes += _rows(infer_flow(name, catalog=catalog, store_root=store_root, return_state=True),
                          name, "infer")
    return final_state(outcomes, key="nightly")

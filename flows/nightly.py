"""The ``nightly`` flow: every catalog dataset (or the named ones), every new or changed scan,
through ingest -> infer (the dataset's champion, resolved once; trained first when none is
registered and the dataset has labels) -> evaluate (where labels exist) -> export (the catalog's
format). See flows/chain.py for how work is decided from digests.

A second run with nothing new computes nothing: every step reports ``unchanged``. One scan failing
never stops the others; the run ends Failed naming each failed scan and step. The summary is a
Prefect markdown artifact, a table artifact and an MLflow run per dataset (``nightly <date>``).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from data_catalog import DEFAULT_CATALOG_DIR, load_catalog
from flows import summary
from flows.chain import ChainOptions, run_dataset
from flows.infer import ensure_gpu_limit, forget_models
from flows.outcomes import ScanOutcome, final_state
from tasks.errors import ScanError
from tasks.ingest import discover_scans


def select_datasets(catalog: str, datasets: list[str] | None):
    """The catalog's entries, or the named ones; ValueError naming any name the catalog lacks."""
    entries = load_catalog(Path(catalog))
    if not datasets:
        return entries
    known = {e.entry.name for e in entries}
    unknown = [d for d in datasets if d not in known]
    if unknown:
        raise ValueError(f"unknown dataset{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} in {catalog}; "
                         f"the catalog has: {', '.join(sorted(known))}")
    return [e for e in entries if e.entry.name in datasets]


def run_entries(entries, catalog: str, store_root: str | None, options: ChainOptions, select=None,
                logger=None) -> list[ScanOutcome]:
    """The chain over each entry's scans (``select(loaded, specs)`` narrows them, for backfill)."""
    ensure_gpu_limit()
    forget_models()
    outcomes: list[ScanOutcome] = []
    for loaded in entries:
        name = loaded.entry.name
        try:
            specs = discover_scans(loaded)
            if select is not None:
                specs = select(loaded, specs)
        except (ScanError, ValueError) as exc:
            outcomes.append(ScanOutcome(name, "*", "discover", "failed", message=str(exc)))
            continue
        if not specs:
            logger.warning("%s: no scan to process", name)
            continue
        outcomes += run_dataset(loaded, specs, catalog, store_root, options)
    return outcomes


def finish(title: str, outcomes: list[ScanOutcome], key: str, logger):
    if outcomes and not any(o.did_work or o.failed for o in outcomes):
        logger.info("nothing new: %d scans, every step unchanged", len({(o.dataset, o.scan_id) for o in outcomes}))
    summary.create_artifact(title, outcomes, key=f"{key}-summary")
    return final_state(outcomes, key=key)


@flow(name="nightly")
def nightly_flow(catalog: str = str(DEFAULT_CATALOG_DIR), datasets: list[str] | None = None,
                 store_root: str | None = None, force: bool = False, infer: bool = True,
                 train_missing: bool = True, dask: str | None = None):
    """``force``: recompute every step of every scan. ``infer=False``: ingest (and train missing
    models unless ``train_missing`` is False), no inference, evaluation or export. ``dask``: run
    the engine's regions on that Dask cluster (default: the catalog's ``tiling.dask``)."""
    logger = get_run_logger()
    entries = select_datasets(catalog, datasets)
    options = ChainOptions(force=force, infer=infer, train_missing=train_missing, dask=dask, kind="nightly")
    outcomes = run_entries(entries, catalog, store_root, options, logger=logger)
    return finish(f"tilewise {summary.run_name('nightly')}", outcomes, "nightly", logger)

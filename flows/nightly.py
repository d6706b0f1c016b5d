"""The ``nightly`` flow: every catalog dataset, every new or changed scan, through every step.

Today the steps are: ingest. Each dataset runs as its own ``ingest`` subflow, so one dataset's
failure is visible on its own and never stops the next one.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from data_catalog import DEFAULT_CATALOG_DIR, load_catalog
from flows.ingest import ingest_flow
from flows.outcomes import ScanOutcome, final_state


@flow(name="nightly")
def nightly_flow(catalog: str = str(DEFAULT_CATALOG_DIR), datasets: list[str] | None = None,
                 store_root: str | None = None, force: bool = False):
    logger = get_run_logger()
    entries = [e for e in load_catalog(Path(catalog)) if not datasets or e.entry.name in datasets]
    outcomes: list[ScanOutcome] = []
    for loaded in entries:
        name = loaded.entry.name
        state = ingest_flow(name, catalog=catalog, store_root=store_root, force=force, return_state=True)
        result = state.result(raise_on_failure=False)
        if isinstance(result, list):
            outcomes.extend(result)
        else:  # the subflow itself broke (catalog, discovery): one row for the dataset
            logger.error("%s: ingest flow failed: %s", name, result)
            outcomes.append(ScanOutcome(name, "*", "ingest", "failed", message=str(result)))
    return final_state(outcomes, key="nightly")

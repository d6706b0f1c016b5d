"""The ``calibrate`` flow: fit a dataset's model version's calibrator on its validation split and
store it with the version in MLflow (tasks/calibration/model_version.py does the work)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from data_catalog import DEFAULT_CATALOG_DIR, find_entry
from flows.infer import model_uri
from tasks.calibration.model_version import CalibrationOutcome, calibrate_model


@task(name="calibrate-model", task_run_name="calibrate {uri}", cache_policy=NO_CACHE, persist_result=False)
def calibrate_task(dataset: str, catalog: str, uri: str, method: str, store_root: str | None) -> CalibrationOutcome:
    outcome = calibrate_model(find_entry(dataset, Path(catalog)), uri, method, store_root)
    get_run_logger().info("%s: %s (%s)", outcome.model, outcome.calibrator.method, outcome.calibrator.chosen_because)
    return outcome


@flow(name="calibrate", flow_run_name="calibrate {dataset}")
def calibrate_flow(dataset: str, catalog: str = str(DEFAULT_CATALOG_DIR), model: str | None = None,
                   method: str | None = None, store_root: str | None = None) -> CalibrationOutcome:
    """Calibrate ``model`` (default: the catalog's ``models:/NAME@ALIAS``) with ``method`` (default:
    the catalog's ``calibration.method``; ``none`` there means ``auto`` when asked explicitly)."""
    entry = find_entry(dataset, Path(catalog)).entry
    uri = model or model_uri(entry)
    if uri is None:
        raise ValueError(f"dataset '{dataset}' names no model in the catalog; pass --model")
    chosen = method or entry.calibration.method
    if chosen == "none":
        chosen = "auto"
    return calibrate_task(dataset, catalog, uri, chosen, store_root)


def run_calibration(dataset: str, catalog: str, model: str | None, method: str | None) -> CalibrationOutcome:
    """The flow from the CLI: its result, or its error raised (one line)."""
    state = calibrate_flow(dataset, catalog=catalog, model=model, method=method, return_state=True)
    result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        raise result
    return result


def calibration_table(outcome: CalibrationOutcome):
    """Every candidate's held-out ECE / Brier / NLL before and after, the chosen one marked."""
    from rich.table import Table

    cal = outcome.calibrator
    table = Table(title=f"calibration of {outcome.model} on held-out validation pixels "
                        f"(validation split {outcome.regions_from})")
    for col in ("method", "ECE before → after", "Brier before → after", "NLL before → after"):
        table.add_column(col, overflow="fold")  # full names when piped (80 columns)
    for name, res in cal.candidates.items():
        before, after = res.get("before", {}), res.get("after")
        mark = f"{name} (chosen)" if name == cal.method else name
        if after is None:
            table.add_row(mark, f"{before.get('ece', float('nan')):.4f} → failed", "", res.get("error", ""))
            continue
        table.add_row(mark, *(f"{before[k]:.4f} → {after[k]:.4f}" for k in ("ece", "brier", "nll")))
    return table

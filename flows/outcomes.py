"""What a flow reports per scan and step, and how a list of those ends a flow run."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

from prefect.artifacts import create_table_artifact
from prefect.states import Completed, Failed, State

# Statuses that mean "nothing was computed": the step found its output up to date.
NO_WORK = ("unchanged", "kept", "skipped")


@dataclass(frozen=True)
class ScanOutcome:
    dataset: str
    scan_id: str  # "*" for a dataset-wide step (train, model resolution)
    step: str  # "ingest" | "train" | "infer" | "evaluate" | "export"
    status: str  # "ingested" | "inferred" | "resumed" | "evaluated" | "exported" | "unchanged" | "kept" | "skipped" | "failed" ...
    store: str = ""
    message: str = ""
    seconds: float = 0.0
    model: str = ""  # the model version the step used (models:/NAME/VERSION), when it used one
    output: str = ""  # the file or group the step wrote (or found up to date)
    metrics: dict = field(default_factory=dict, hash=False, compare=False)  # evaluate: the flat metrics

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    @property
    def did_work(self) -> bool:
        return not self.failed and self.status not in NO_WORK


PROGRESS_LOGGER = "flows.progress"
_progress = logging.getLogger(PROGRESS_LOGGER)
_progress.setLevel(logging.INFO)  # what a run's progress display counts, whatever the root's level


def plan(dataset: str, scans: int, steps: list[str]) -> None:
    """Say that ``dataset``'s run takes ``scans`` scans through ``steps`` (what progress counts up to):
    an INFO record carrying ``tilewise_plan`` (flows/progress.py draws it; the log file keeps it)."""
    _progress.info("%s: %d scans through %s", dataset, scans, ", ".join(steps),
                   extra={"tilewise_plan": {"dataset": dataset, "scans": scans, "steps": list(steps)}})


def report(outcome: ScanOutcome) -> ScanOutcome:
    """Say that a step of a scan ended (an INFO record carrying ``tilewise_step``; a failure is also
    logged as an error by the flow, which the console shows); returns ``outcome``."""
    _progress.info("%s/%s: %s %s%s", outcome.dataset,
                  outcome.scan_id, outcome.step, outcome.status, f": {outcome.message}" if outcome.failed else "",
                  extra={"tilewise_step": {k: v for k, v in asdict(outcome).items() if k != "metrics"}})
    return outcome


def failure_message(outcomes: list[ScanOutcome]) -> str:
    """What failed, a line each: "2 of 6 scans failed, 1 dataset step failed:" then the steps."""
    failed = [o for o in outcomes if o.failed]
    scans = {(o.dataset, o.scan_id) for o in outcomes if o.scan_id != "*"}
    bad = {(o.dataset, o.scan_id) for o in failed if o.scan_id != "*"}
    wide = [o for o in failed if o.scan_id == "*"]
    head = ([f"{len(bad)} of {len(scans)} scans failed"] if bad else []) + (
        [f"{len(wide)} dataset step{'s' if len(wide) > 1 else ''} failed"] if wide else [])
    lines = [", ".join(head) + ":"]
    lines += [f"  {o.dataset}{'' if o.scan_id == '*' else '/' + o.scan_id} ({o.step}): {o.message}" for o in failed]
    return "\n".join(lines)


def final_state(outcomes: list[ScanOutcome], key: str) -> State:
    """Completed when every scan went through, else Failed naming each failure; either way the
    outcomes are the run's result and a table artifact in the Prefect UI."""
    create_table_artifact(
        key=key,
        table=[{"dataset": o.dataset, "scan": o.scan_id, "step": o.step, "status": o.status,
                "seconds": round(o.seconds, 2), "model": o.model, "output": o.output, "message": o.message}
               for o in outcomes],
        description="per-scan outcome of this run",
    )
    if any(o.failed for o in outcomes):
        return Failed(message=failure_message(outcomes), data=outcomes)
    return Completed(message=f"{len(outcomes)} ok", data=outcomes)

"""What a flow reports per scan and step, and how a list of those ends a flow run."""

from __future__ import annotations

from dataclasses import dataclass, field

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


def failure_message(outcomes: list[ScanOutcome]) -> str:
    failed = [o for o in outcomes if o.failed]
    scans = {(o.dataset, o.scan_id) for o in outcomes}
    bad = {(o.dataset, o.scan_id) for o in failed}
    lines = [f"{len(bad)} of {len(scans)} scans failed:"]
    lines += [f"  {o.dataset}/{o.scan_id} ({o.step}): {o.message}" for o in failed]
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

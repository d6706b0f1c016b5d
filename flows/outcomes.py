"""What a flow reports per scan, and how a list of those ends a flow run."""

from __future__ import annotations

from dataclasses import dataclass

from prefect.artifacts import create_table_artifact
from prefect.states import Completed, Failed, State


@dataclass(frozen=True)
class ScanOutcome:
    dataset: str
    scan_id: str
    step: str  # "ingest", later "infer", "evaluate", ...
    status: str  # "ingested" | "unchanged" | "failed" | ...
    store: str = ""
    message: str = ""
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.status == "failed"


def failure_message(outcomes: list[ScanOutcome]) -> str:
    failed = [o for o in outcomes if o.failed]
    lines = [f"{len(failed)} of {len(outcomes)} scans failed:"]
    lines += [f"  {o.dataset}/{o.scan_id} ({o.step}): {o.message}" for o in failed]
    return "\n".join(lines)


def final_state(outcomes: list[ScanOutcome], key: str) -> State:
    """Completed when every scan went through, else Failed naming each failure; either way the
    outcomes are the run's result and a table artifact in the Prefect UI."""
    create_table_artifact(
        key=key,
        table=[{"dataset": o.dataset, "scan": o.scan_id, "step": o.step, "status": o.status,
                "seconds": round(o.seconds, 2), "message": o.message} for o in outcomes],
        description="per-scan outcome of this run",
    )
    if any(o.failed for o in outcomes):
        return Failed(message=failure_message(outcomes), data=outcomes)
    return Completed(message=f"{len(outcomes)} ok", data=outcomes)

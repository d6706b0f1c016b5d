"""``tilewise serve``: the catalog's schedules as Prefect deployments, served by this process.

One ``nightly/<dataset>`` deployment per catalog dataset, on the dataset's ``schedule.cron`` in its
``schedule.timezone`` (a Prefect ``Cron`` schedule, so 02:00 Europe/Paris stays 02:00 local across
daylight-saving changes), with parameters ``catalog=<absolute catalog dir>, datasets=[<dataset>]``;
and one ``backfill/backfill`` deployment with no schedule, run from the Prefect UI or with
``prefect deployment run 'backfill/backfill' -p dataset=NAME [-p since=2024-01-01] [-p force=true]``.

Served deployments run their flows in subprocesses of this process (Prefect's ``Runner``); their
entrypoints are module paths (``flows.nightly.nightly_flow``), so ``serve`` works from any folder.

Pause and restart. Prefect's ``serve`` pauses every served deployment when it stops (so no runs pile
up as *Late* while nothing executes them). Every start registers each deployment again with
``paused=False`` and active schedules, and then checks, through the API, that none is left paused
or with an inactive schedule (resuming any that is): a restart always re-activates the schedules.
A served ``nightly/<name>`` deployment whose dataset left the catalog is paused (not deleted: its
run history stays); work-pool deployments (``prefect.yaml``) are left alone.

A Prefect *server* is required (``PREFECT_API_URL``): the embedded API of ``tilewise run`` lives
only as long as one command and nothing else (UI, ``prefect deployment run``) can reach it.
"""

from __future__ import annotations

import os
from pathlib import Path

from data_catalog import load_catalog

NIGHTLY_FLOW = "nightly"
BACKFILL_FLOW = "backfill"
BACKFILL_DEPLOYMENT = "backfill"


class ServeError(RuntimeError):
    """``serve`` cannot start (no server to serve against, a deployment the API refuses)."""


def require_server() -> str:
    """The Prefect API URL to serve against; ``ServeError`` when none is configured."""
    from prefect.settings import PREFECT_API_URL

    url = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
    if not url:
        raise ServeError(
            "tilewise serve needs a Prefect server: start one (`prefect server start`, or "
            "`docker compose up -d`) and set PREFECT_API_URL=http://127.0.0.1:4200/api")
    return url


def build_deployments(catalog: Path) -> list:
    """The ``RunnerDeployment`` objects for a catalog folder: nightly per dataset, then backfill.

    Schedules are ``prefect.schedules.Cron(cron, timezone=tz)`` from each entry's ``schedule``
    (validated at catalog load); every deployment is created unpaused.
    """
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    from flows.backfill import backfill_flow
    from flows.nightly import nightly_flow

    catalog_dir = str(Path(catalog).resolve())
    deployments = []
    for loaded in load_catalog(Path(catalog_dir)):
        entry = loaded.entry
        sched = entry.schedule
        deployments.append(nightly_flow.to_deployment(
            name=entry.name,
            schedules=[Cron(sched.cron, timezone=sched.timezone, active=True)],
            parameters={"catalog": catalog_dir, "datasets": [entry.name]},
            paused=False,
            tags=["tilewise", "nightly", entry.name],
            description=f"Nightly job for {entry.name}: {sched.cron} ({sched.timezone}); "
                        f"catalog {loaded.file}",
            entrypoint_type=EntrypointType.MODULE_PATH,
        ))
    deployments.append(backfill_flow.to_deployment(
        name=BACKFILL_DEPLOYMENT,
        parameters={"catalog": catalog_dir},
        paused=False,
        tags=["tilewise", "backfill"],
        description="Backfill one dataset over a date range (parameters: dataset, since, until, force).",
        entrypoint_type=EntrypointType.MODULE_PATH,
    ))
    return deployments


def reactivate(deployment_names: list[str], stale_nightly_pause: bool = True) -> list[str]:
    """Make sure the named deployments (``flow/deployment``) are unpaused with active schedules.

    Returns a line per change made. Also pauses ``nightly/*`` deployments not in the list (datasets
    that left the catalog) when ``stale_nightly_pause``.
    """
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import DeploymentSort

    changes: list[str] = []
    with get_client(sync_client=True) as client:
        for full in deployment_names:
            dep = client.read_deployment_by_name(full)
            if dep.paused:
                client.resume_deployment(dep.id)
                changes.append(f"{full}: resumed")
            for sched in dep.schedules:
                if not sched.active:
                    client.update_deployment_schedule(dep.id, sched.id, active=True)
                    changes.append(f"{full}: schedule {sched.schedule} re-activated")
        if stale_nightly_pause:
            wanted = {n.split("/", 1)[1] for n in deployment_names if n.startswith(NIGHTLY_FLOW + "/")}
            # limit and sort spelled out: the sync client sends null for both otherwise (HTTP 422)
            nightly = FlowFilter(name=FlowFilterName(any_=[NIGHTLY_FLOW]))
            for dep in client.read_deployments(flow_filter=nightly, limit=200, sort=DeploymentSort.NAME_ASC):
                # only served ones: work-pool deployments (prefect.yaml) belong to their workers
                if dep.name not in wanted and not dep.paused and dep.work_pool_name is None:
                    client.pause_deployment(dep.id)
                    changes.append(f"{NIGHTLY_FLOW}/{dep.name}: paused (not in the catalog)")
    return changes


def serve_catalog(catalog: Path, limit: int | None = None, on_started=None) -> None:
    """Register the catalog's deployments and serve them until interrupted (SIGINT / SIGTERM).

    ``limit``: at most this many flow runs at once in this process. ``on_started(lines)`` is
    called once the deployments are registered and checked, with one line per deployment.
    """
    import asyncio

    from prefect.exceptions import TerminationSignal
    from prefect.runner import Runner

    import warnings

    # Prefect 3.8.8's SIGTERM handler calls the async stop() without awaiting it; shutdown (and the
    # pause) still happens through the runner's context exit, so the warning is noise.
    warnings.filterwarnings("ignore", message="coroutine 'Runner.astop' was never awaited")
    require_server()
    deployments = build_deployments(catalog)
    runner = Runner(name="tilewise-serve", pause_on_shutdown=True, limit=limit)
    for deployment in deployments:
        runner.add_deployment(deployment)  # sync: creates / updates the deployment in the API
    names = [f"{d.flow_name}/{d.name}" for d in deployments]
    changes = reactivate(names)
    lines = []
    for d in deployments:
        when = ", ".join(f"{s.schedule.cron} ({s.schedule.timezone})" for s in (d.schedules or []))
        lines.append(f"{d.flow_name}/{d.name}: {when or 'no schedule (run on demand)'}")
    if on_started is not None:
        on_started(lines + changes)
    try:
        asyncio.run(runner.start())
    except (KeyboardInterrupt, TerminationSignal):
        pass  # the runner pauses the schedules on its way out; the next start resumes them

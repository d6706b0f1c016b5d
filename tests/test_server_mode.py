"""Client-server mode for real: a Prefect server and an MLflow server as processes on 127.0.0.1.

The servers run on SQLite (Prefect: ``sqlite+aiosqlite``; MLflow: ``--backend-store-uri sqlite:///``),
not PostgreSQL: CI cannot be assumed to install and start PostgreSQL from the distribution's packages
in reasonable time, and the client side (what tilewise does) is the same against either database.
The docker-compose stack (tests/test_compose.py) is the PostgreSQL + MinIO variant.

- The Prefect server requires basic auth (``PREFECT_SERVER_API_AUTH_STRING``, as in the compose
  stack); the clients send ``PREFECT_API_AUTH_STRING``. MLflow serves artifacts from a folder
  (``--artifacts-destination``) through its own API, so the client never writes them itself.
- ``tilewise run nightly`` runs as a subprocess with ``PREFECT_API_URL`` / ``MLFLOW_TRACKING_URI``;
  the registered model, its champion alias, the training run and metrics, and the Completed flow
  run are then read back from the servers, never from local files.
- ``tilewise serve`` runs as a subprocess, is stopped (SIGTERM: Prefect pauses the deployments) and
  started again: the deployments are unpaused, the schedules active, and the server's scheduler
  creates runs at the catalog's local time; the ``backfill`` deployment runs on demand through
  ``prefect deployment run``.

Every process is started in its own session and killed by process group at the end.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
AUTH = "tilewise:test-only-secret"
EM = Path(__file__).resolve().parents[1] / "data_catalog" / "samples" / "em" / "isbi2012_train"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any Prefect / MLflow setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false", **extra)
    return env


class Processes:
    """Subprocesses in their own sessions, each killed with its whole process group."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=self.logs)
        proc.log_path = self.logs / f"{name}.log"
        self.procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, wait: float = 30) -> int | None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            except ProcessLookupError:
                pass
        try:  # children left behind (a flow run's subprocess) go too
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return proc.returncode

    def close(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc, wait=15)


def log_tail(proc: subprocess.Popen, n: int = 3000) -> str:
    return proc.log_path.read_text(errors="replace")[-n:]


def wait_for(check, proc: subprocess.Popen, what: str, timeout: float = 180):
    """Poll ``check()`` until it returns a truthy value; fail with the process's log otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what}: process exited with {proc.returncode}\n{log_tail(proc)}")
        try:
            value = check()
            if value:
                return value
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)
    pytest.fail(f"{what}: not ready after {timeout} s\n{log_tail(proc)}")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status == 200


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("server-mode")
    procs = Processes(root)
    prefect_port, mlflow_port = free_port(), free_port()
    prefect_env = clean_env(
        PREFECT_HOME=str(root / "prefect-server"),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{root}/prefect.db",
        PREFECT_SERVER_API_AUTH_STRING=AUTH,
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="1",
    )
    try:
        prefect = procs.start("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                                 "--port", str(prefect_port)], prefect_env)
        mlflow = procs.start("mlflow-server", [
            str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
            "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination", str(root / "artifacts"), "--workers", "1"], clean_env())
        prefect_url = f"http://127.0.0.1:{prefect_port}/api"
        mlflow_url = f"http://127.0.0.1:{mlflow_port}"
        wait_for(lambda: http_ok(f"{prefect_url}/health"), prefect, "prefect server")
        wait_for(lambda: http_ok(f"{mlflow_url}/health"), mlflow, "mlflow server")
        yield {"root": root, "procs": procs, "prefect_url": prefect_url, "mlflow_url": mlflow_url,
               "prefect": prefect}
    finally:
        procs.close()


def client_env(servers, home: Path) -> dict[str, str]:
    return clean_env(PREFECT_API_URL=servers["prefect_url"], PREFECT_API_AUTH_STRING=AUTH,
                     MLFLOW_TRACKING_URI=servers["mlflow_url"], TILEWISE_HOME=str(home),
                     PREFECT_HOME=str(home / "prefect-client"))


def prefect_client(servers):
    """A sync Prefect client bound to the test server (not the session's embedded one)."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    class _Bound:
        def __enter__(self):
            self._settings = temporary_settings({PREFECT_API_URL: servers["prefect_url"],
                                                 PREFECT_API_AUTH_STRING: AUTH})
            self._settings.__enter__()
            self._client = get_client(sync_client=True)
            return self._client.__enter__()

        def __exit__(self, *exc):
            self._client.__exit__(*exc)
            self._settings.__exit__(*exc)

    return _Bound()


def em_stack(dest: Path, slices: list[int], labels: bool = True) -> Path:
    for kind in ("image", "label") if labels else ("image",):
        (dest / kind).mkdir(parents=True)
        for i in slices:
            shutil.copy(EM / kind / f"{i}.png", dest / kind / f"{i}.png")
    return dest


def test_prefect_server_refuses_requests_without_the_auth_string(servers):
    request = urllib.request.Request(f"{servers['prefect_url']}/flows/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 401


def test_nightly_against_the_servers_is_read_back_from_them(servers, tmp_path):
    """Train (tiny budget) → register → calibrate → infer → evaluate → export, through the servers."""
    from mlflow import MlflowClient

    em_stack(tmp_path / "stacks" / "isbi_a", [0, 1])
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    (catalog / "em.yaml").write_text(textwrap.dedent(f"""
        name: em_server
        modality: em
        scans: {{path: "{tmp_path}/stacks/*/image", id: "{{parent}}"}}
        labels: {{path: "{{dir}}/label", mapping: {{255: 0, 0: 1}}, classes: [interior, membrane]}}
        reader: {{spacing: [50, 4, 4], unit: nanometer}}
        chunks: [2, 256, 256]
        model: {{architecture: unet}}
        tiling: {{tile: [128, 128], overlap: 0.25, batch: 4}}
        training: {{epochs: 1, max_minutes: 0.2}}
        calibration: {{method: cubic}}
        export: {{format: tiff}}
    """))
    home = tmp_path / "home"
    started = time.monotonic()
    done = subprocess.run([str(BIN / "tilewise"), "run", "nightly", "--catalog", str(catalog),
                           "--dataset", "em_server"], env=client_env(servers, home), cwd=tmp_path,
                          capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    finished = time.monotonic() - started

    # MLflow: model, champion alias, the training run and its metrics, artifacts on the server's side.
    client = MlflowClient(tracking_uri=servers["mlflow_url"], registry_uri=servers["mlflow_url"])
    version = client.get_model_version_by_alias("em_server-unet", "champion")
    assert version.version == "1"
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics, "the training run logged no metrics"
    assert any(k.startswith("best_") for k in run.data.metrics), sorted(run.data.metrics)
    history = client.get_metric_history(run.info.run_id, "train_loss") if "train_loss" in run.data.metrics else []
    assert all(m.value == m.value for m in history)  # no NaN losses logged
    served = [p for p in (servers["root"] / "artifacts").rglob("*") if p.is_file()]
    assert served, "no artifact reached the MLflow server's artifact store"
    assert not (home / "mlflow.db").exists() and not (home / "mlflow-artifacts").exists(), \
        "the client fell back to the embedded MLflow"

    # Prefect: the nightly flow run, Completed, on the server (not an embedded API).
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with prefect_client(servers) as pc:
        runs = pc.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["nightly"])),
                                 limit=10, sort=FlowRunSort.START_TIME_DESC)
        assert runs, "the server has no nightly flow run"
        assert runs[0].state.is_completed(), (runs[0].state.name, runs[0].state.message)
        trained = pc.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["train"])),
                                    limit=10, sort=FlowRunSort.START_TIME_DESC)
        assert trained and trained[0].parent_task_run_id is not None  # a subflow of the nightly run
    print(f"nightly against the servers: {finished:.0f} s")


def _deployment(pc, name: str):
    return pc.read_deployment_by_name(name)


def _scheduled_starts(pc, deployment_id) -> list[dt.datetime]:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter
    from prefect.client.schemas.filters import FlowRunFilterState, FlowRunFilterStateName
    from prefect.client.schemas.sorting import FlowRunSort

    runs = pc.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(name=FlowRunFilterStateName(any_=["Scheduled"]))),
        limit=20, sort=FlowRunSort.EXPECTED_START_TIME_ASC)
    return [r.expected_start_time for r in runs]


def test_serve_restart_reactivates_schedules_and_backfill_runs_on_demand(servers, tmp_path):
    em_stack(tmp_path / "stacks" / "isbi_b", [2], labels=False)
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    (catalog / "served.yaml").write_text(textwrap.dedent(f"""
        name: served
        modality: em
        scans: {{path: "{tmp_path}/stacks/*/image", id: "{{parent}}"}}
        reader: {{spacing: [50, 4, 4], unit: nanometer}}
        chunks: [1, 256, 256]
        model: {{architecture: unet}}
        schedule: {{cron: "30 1 * * *", timezone: Europe/Paris}}
    """))
    home = tmp_path / "home"
    env = client_env(servers, home)
    procs: Processes = servers["procs"]
    serve_cmd = [str(BIN / "tilewise"), "serve", "--catalog", str(catalog)]
    paris = ZoneInfo("Europe/Paris")

    def serving(proc):
        return wait_for(lambda: "serving" in proc.log_path.read_text(errors="replace"), proc, "tilewise serve",
                        timeout=120)

    def check_live(pc):
        nightly = _deployment(pc, "nightly/served")
        assert not nightly.paused
        assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in nightly.schedules] == \
            [("30 1 * * *", "Europe/Paris", True)]
        assert nightly.parameters["datasets"] == ["served"]
        assert nightly.parameters["catalog"] == str(catalog.resolve())
        backfill = _deployment(pc, "backfill/backfill")
        assert not backfill.paused and backfill.schedules == []
        # The server's scheduler creates the runs: every one at 01:30 Paris time (CET or CEST).
        starts = wait_for(lambda: _scheduled_starts(pc, nightly.id), servers["prefect"],
                          "scheduled runs of nightly/served", timeout=60)
        assert all(s.astimezone(paris).time() == dt.time(1, 30) for s in starts), starts
        return nightly

    first = procs.start("serve-1", serve_cmd, env)
    serving(first)
    with prefect_client(servers) as pc:
        check_live(pc)

    # backfill/backfill runs on demand, executed by the serving process.
    done = subprocess.run([str(BIN / "prefect"), "deployment", "run", "backfill/backfill", "-p", "dataset=served",
                           "--watch", "--watch-timeout", "240"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + log_tail(first)
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with prefect_client(servers) as pc:
        runs = pc.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["backfill"])), limit=5,
                                 sort=FlowRunSort.START_TIME_DESC)
        assert len(runs) == 1 and runs[0].state.is_completed(), [(r.state_name, r.state.message) for r in runs]
        assert runs[0].parameters["dataset"] == "served"
    assert list(home.rglob("isbi_b.zarr")), "the backfill ingested nothing under the serving TILEWISE_HOME"

    assert procs.stop(first) is not None
    with prefect_client(servers) as pc:  # Prefect's serve pauses what it served when it stops ...
        assert _deployment(pc, "nightly/served").paused

    second = procs.start("serve-2", serve_cmd, env)  # ... and a restart re-activates everything
    serving(second)
    with prefect_client(servers) as pc:
        check_live(pc)
    procs.stop(second)


def test_prefect_yaml_deploys_to_a_tilewise_work_pool(servers, tmp_path):
    """``prefect deploy --all`` from the repository accepts prefect.yaml: the same deployments, on a
    ``tilewise`` process work pool, with the catalog's schedules and time zones (last in this module:
    these deployments share their names with the served ones)."""
    from data_catalog import DEFAULT_CATALOG_DIR, load_catalog

    repo = Path(__file__).resolve().parents[1]
    env = client_env(servers, tmp_path / "home")
    env["PWD"] = str(repo)
    for cmd in (["work-pool", "create", "tilewise", "--type", "process", "--overwrite"],
                ["--no-prompt", "deploy", "--all"]):
        done = subprocess.run([str(BIN / "prefect"), *cmd], env=env, cwd=repo, capture_output=True, text=True,
                              timeout=180)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with prefect_client(servers) as pc:
        for loaded in load_catalog(DEFAULT_CATALOG_DIR):
            entry = loaded.entry
            dep = _deployment(pc, f"nightly/{entry.name}")
            assert dep.work_pool_name == "tilewise" and dep.entrypoint == "flows/nightly.py:nightly_flow"
            assert dep.parameters == {"catalog": str(repo / "data_catalog"), "datasets": [entry.name]}
            assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in dep.schedules] == \
                [(entry.schedule.cron, entry.schedule.timezone, True)]
        backfill = _deployment(pc, "backfill/backfill")
        assert backfill.work_pool_name == "tilewise" and backfill.entrypoint == "flows/backfill.py:backfill_flow"
        assert backfill.schedules == []

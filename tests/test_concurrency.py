"""Two runs on one store, with real processes: the second waits or fails in one line, never
corrupts the first's output; a lock left by a killed run does not block. Plus the lock's own
semantics in one process (threads, object-storage markers) and registry outages.

A "holder" is a real process running the real ``ingest_scan`` / ``infer_scan`` whose progress
callback pauses at a gate (a file the test creates) after its first slab or batch: it holds the
lock and has written part of the store, for as long as the test needs, without any timing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import zarr
from rasterio.transform import from_origin

from tasks import storage
from tasks.engine.infer import EngineConfig, infer_scan
from tasks.engine.model_io import load_model
from tests.gates import env as gate_env, start_paused
from tests.test_engine import conv_net, make_scan, predicted

ROOT = Path(__file__).resolve().parents[1]

HOLDER = r'''
import sys, time
from pathlib import Path
gate = Path(sys.argv[1])

def pause(done, total):
    if not (gate / "paused").exists():
        (gate / "paused").write_text("1")
        deadline = time.monotonic() + 120
        while not (gate / "go").exists():
            if time.monotonic() > deadline:
                raise SystemExit("the test never opened the gate")
            time.sleep(0.02)

if sys.argv[2] == "ingest":
    from tasks.ingest import ScanSpec, ingest_scan
    result = ingest_scan(ScanSpec("s", "satellite", (Path(sys.argv[4]),)), sys.argv[3], progress=pause)
else:
    from tasks.engine.infer import EngineConfig, infer_scan
    from tasks.engine.model_io import load_model
    config = EngineConfig(tile=(32, 32), output_dtype="float32", batch=2)
    result = infer_scan(sys.argv[3], load_model(sys.argv[4]), config, progress=pause)
print(result.status, flush=True)
'''


def _holder(tmp_path: Path, kind: str, store: str, source: str) -> tuple[subprocess.Popen, Path]:
    """Start a holder and return once it is paused inside the lock, mid-write."""
    return start_paused(tmp_path, HOLDER, kind, kind, store, source, timeout=120)


def _cli(tmp_path: Path, *args: str, wait: bool = True, **env: str):
    cmd = [sys.executable, "-m", "flows.cli", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=gate_env(tmp_path, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def _said(out: str) -> str:
    """The command's result line (the last one; the CLI may print where its home is first)."""
    lines = [line for line in out.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _assert_busy(rc: int, out: str, err: str, store: str, purpose: str, holder_pid: int) -> None:
    """Exit 1, one error line naming the store and the holder, no traceback."""
    assert rc == 1, (out, err)
    assert "Traceback" not in out + err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert errors[0].startswith(f"error: {store}: another tilewise run (pid {holder_pid} on ")
    assert f", {purpose} since " in errors[0] and "holds the lock" in errors[0]


def _geotiff(path: Path, seed: int = 0) -> np.ndarray:
    """3 x 1024 x 1024 uint8 with a CRS: two 512-row slabs, so the holder pauses mid-write."""
    data = np.random.default_rng(seed).integers(0, 255, (3, 1024, 1024), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=1024, height=1024, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000, 4000000, 0.5, 0.5)) as dst:
        dst.write(data)
    return data


def _release(proc: subprocess.Popen, gate: Path) -> str:
    (gate / "go").write_text("1")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out.strip()


# ---- ingest vs ingest ----------------------------------------------------------------------------

def test_second_ingest_fails_in_one_line_or_waits_and_the_store_ends_whole(tmp_path):
    source = tmp_path / "big.tif"
    data = _geotiff(source)
    store = str(tmp_path / "big.zarr")
    holder, gate = _holder(tmp_path, "ingest", store, str(source))
    assert Path(f"{store}.lock").is_file()
    assert json.loads(Path(f"{store}.lock").read_text())["pid"] == holder.pid

    _assert_busy(*_cli(tmp_path, "ingest", str(source), "--store", store), store, "ingest", holder.pid)
    assert (Path(store) / "image" / "0").is_dir()  # the failed run removed nothing of the holder's

    waiter = _cli(tmp_path, "ingest", str(source), "--store", store, wait=False, TILEWISE_LOCK_WAIT="240")
    forced = _cli(tmp_path, "ingest", str(source), "--store", store, "--force")  # refused too
    _assert_busy(*forced, store, "ingest", holder.pid)
    assert waiter.poll() is None  # it cannot have finished: the holder still holds the lock
    assert _release(holder, gate) == "ingested"
    out, err = waiter.communicate(timeout=300)
    assert waiter.returncode == 0 and _said(out).startswith("unchanged:"), (out, err)

    assert storage.is_complete(store)
    np.testing.assert_array_equal(zarr.open_array(f"{store}/image/0", mode="r")[:], data)
    assert not Path(f"{store}.lock").exists()  # released and removed
    rc, out, err = _cli(tmp_path, "ingest", str(source), "--store", store)
    assert rc == 0 and _said(out).startswith("unchanged:"), (out, err)


def test_a_lock_left_by_a_killed_ingest_does_not_block(tmp_path):
    source = tmp_path / "big.tif"
    data = _geotiff(source, seed=3)
    store = str(tmp_path / "killed.zarr")
    holder, _ = _holder(tmp_path, "ingest", store, str(source))
    os.kill(holder.pid, signal.SIGKILL)
    holder.communicate(timeout=60)
    left = json.loads(Path(f"{store}.lock").read_text())
    assert left["pid"] == holder.pid and left["purpose"] == "ingest"  # the dead run's lock is still there
    assert not storage.is_complete(store)

    rc, out, err = _cli(tmp_path, "ingest", str(source), "--store", store)
    assert rc == 0 and _said(out).startswith("ingested:"), (out, err)
    assert storage.is_complete(store)
    np.testing.assert_array_equal(zarr.open_array(f"{store}/image/0", mode="r")[:], data)
    assert not Path(f"{store}.lock").exists()


# ---- infer vs infer, and ingest vs infer ---------------------------------------------------------

def test_second_infer_and_an_ingest_are_refused_while_infer_writes(tmp_path):
    array = np.random.default_rng(5).random((1, 192, 192), dtype=np.float32)
    store = make_scan(tmp_path, array, (32, 32), "scan")
    reference = make_scan(tmp_path, array, (32, 32), "reference")
    model = tmp_path / "m.pt"
    torch.jit.script(conv_net(2, 1, 2)).save(str(model))
    config = EngineConfig(tile=(32, 32), output_dtype="float32", batch=2)
    infer_scan(reference, load_model(str(model)), config)

    holder, gate = _holder(tmp_path, "infer", store, str(model))
    args = ["--model", str(model), "--tile", "32,32", "--dtype", "float32", "--batch", "2"]
    _assert_busy(*_cli(tmp_path, "infer", "--store", store, *args), store, "infer", holder.pid)
    # an ingest cannot remove the group under a running infer
    _assert_busy(*_cli(tmp_path, "ingest", str(tmp_path / "scan.tif"), "--store", store, "--force"),
                 store, "infer", holder.pid)
    assert (Path(store) / "prediction" / "done").is_dir() and storage.is_complete(store)

    assert _release(holder, gate) == "inferred"
    assert storage.is_complete(f"{store}/prediction")
    assert np.abs(predicted(store) - predicted(reference)).max() <= 1e-5
    rc, out, err = _cli(tmp_path, "infer", "--store", store, *args)
    assert rc == 0 and _said(out).startswith("unchanged"), (out, err)


# ---- the lock in one process ---------------------------------------------------------------------

def test_lock_is_reentrant_in_a_thread_and_excludes_other_threads(tmp_path):
    store = str(tmp_path / "t.zarr")
    with storage.store_lock(store, purpose="ingest"):
        with storage.store_lock(store, purpose="infer"):  # the same run: no deadlock
            pass
        assert Path(f"{store}.lock").exists()  # still held after the inner block
        seen: list[BaseException] = []
        t = threading.Thread(target=lambda: _try(store, seen))
        t.start()
        t.join()
        assert isinstance(seen[0], storage.StoreBusy) and f"pid {os.getpid()} on " in str(seen[0])
    assert not Path(f"{store}.lock").exists()


def _try(store: str, seen: list) -> None:
    try:
        with storage.store_lock(store, wait=0):
            seen.append(AssertionError("took a held lock"))
    except Exception as exc:
        seen.append(exc)


def test_a_waiting_run_gets_the_lock_when_the_holder_releases_it(tmp_path):
    store = str(tmp_path / "w.zarr")
    release, got = threading.Event(), []

    def hold():
        with storage.store_lock(store):
            got.append("holder")
            release.wait(60)

    def wait():
        with storage.store_lock(store, wait=120):
            got.append("waiter")

    first = threading.Thread(target=hold)
    first.start()
    while not got:
        time.sleep(0.01)
    second = threading.Thread(target=wait)
    second.start()
    second.join(0.5)
    assert got == ["holder"]  # cannot have entered: the holder is inside
    release.set()
    first.join()
    second.join(60)
    assert got == ["holder", "waiter"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_object_storage_marker_busy_stale_and_foreign(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    store = f"memory://locks-{os.getpid()}/scan.zarr"
    marker = f"/locks-{os.getpid()}/scan.zarr.lock"
    with storage.store_lock(store, purpose="infer"):
        assert json.loads(fs.cat_file(marker))["purpose"] == "infer"
        seen: list[BaseException] = []
        t = threading.Thread(target=lambda: _try(store, seen))
        t.start()
        t.join()
        assert isinstance(seen[0], storage.StoreBusy) and "infer since" in str(seen[0])
    assert not fs.exists(marker)

    host = socket.gethostname()
    fs.pipe_file(marker, json.dumps({"pid": _dead_pid(), "host": host, "purpose": "ingest",
                                     "since": "2026-01-01T00:00:00+00:00"}).encode())
    with storage.store_lock(store, wait=0):  # a dead local holder's marker is replaced
        assert json.loads(fs.cat_file(marker))["pid"] == os.getpid()
    assert not fs.exists(marker)

    fs.pipe_file(marker, json.dumps({"pid": 1, "host": "elsewhere", "purpose": "ingest",
                                     "since": "2026-01-01T00:00:00+00:00"}).encode())
    with pytest.raises(storage.StoreBusy, match="pid 1 on elsewhere, ingest since .* remove the marker by hand"):
        with storage.store_lock(store, wait=0):
            pass
    assert fs.exists(marker)  # another host's marker is never removed automatically
    fs.rm_file(marker)


# ---- registry outages ----------------------------------------------------------------------------

@pytest.fixture
def isolated_mlflow(tmp_path, monkeypatch):
    import mlflow

    original = os.environ.get("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("TILEWISE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    yield monkeypatch
    mlflow.set_tracking_uri(original)  # registry.client() sets MLflow's global URI
    mlflow.set_registry_uri(original)


def test_registry_outage_is_not_no_model(isolated_mlflow):
    from models import registry

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"  # closed: nothing listens there
    isolated_mlflow.setenv("MLFLOW_TRACKING_URI", uri)
    isolated_mlflow.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    isolated_mlflow.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    for call in (lambda: registry.has_model("models:/toy-unet@champion"),
                 lambda: registry.describe("models:/toy-unet/1"),
                 lambda: registry._alias_version(registry.client(), "toy-unet", "champion")):
        with pytest.raises(registry.RegistryUnavailable, match=f"model registry at {uri} did not answer"):
            call()
    # code that reads RegistryError as "no such model" cannot swallow an outage
    with pytest.raises(registry.RegistryUnavailable, match="Connection refused|Max retries"):
        try:
            load_model("models:/toy-unet@champion")
        except registry.RegistryError:
            pytest.fail("an outage was read as 'no model'")


def test_registry_not_found_is_false_and_found_is_true(isolated_mlflow):
    from models import registry

    c = registry.client()
    assert registry.has_model("models:/toy-unet@champion") is False  # no such model
    c.create_registered_model("toy-unet")
    version = c.create_model_version("toy-unet", source=(Path.cwd() / "nowhere").as_uri()).version
    assert registry.has_model("models:/toy-unet@champion") is False  # no such alias
    assert registry.has_model("models:/toy-unet/7") is False  # no such version
    assert registry.has_model(f"models:/toy-unet/{version}") is True
    c.set_registered_model_alias("toy-unet", "champion", version)
    assert registry.has_model("models:/toy-unet@champion") is True
    assert registry.resolve_version("models:/toy-unet@champion") == f"models:/toy-unet/{version}"
    with pytest.raises(registry.ModelNotFound, match="no alias 'challenger'"):
        registry.describe("models:/toy-unet@challenger")

"""Readers and writers of one store, with real processes: the shared lock (locally and on S3),
export and evaluate against ``infer --force``, and the NGFF label list around a re-infer.

A "holder" is a real process that takes the store's lock (or runs the real export, evaluate or
``infer --force``) and pauses at a gate (a file the test creates) while it holds it: inside the
lock, mid-read or mid-write, for as long as the test needs, without any timing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import rasterio
import tifffile
import torch
import zarr

from tasks import storage
from tasks.engine.infer import EngineConfig, infer_scan
from tasks.engine.model_io import load_model
from tasks.errors import ScanError
from tests.gates import env as _env, start_paused
from tests.test_concurrency import _assert_busy, _cli
from tests.test_engine import conv_net, make_scan

ROOT = Path(__file__).resolve().parents[1]

HOLDER = r'''
import json, sys, time
from pathlib import Path
gate, kind, store, arg = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]

def pause(*_):
    if not (gate / "paused").exists():
        (gate / "paused").write_text("1")
        deadline = time.monotonic() + 120
        while not (gate / "go").exists():
            if time.monotonic() > deadline:
                raise SystemExit("the test never opened the gate")
            time.sleep(0.02)

if kind == "lock":  # the bare lock: arg is JSON {"shared": ..., "brief": ..., "purpose": ...}
    from tasks.store_lock import store_lock
    with store_lock(store, wait=0, **json.loads(arg)):
        pause()
    print("released", flush=True)
elif kind == "infer-force":  # the nightly's infer step with --force: flows.infer.infer_scan_task
    import flows.infer as fi
    from tasks.engine.infer import EngineConfig
    engine = fi.infer_scan
    fi.infer_scan = lambda s, m, c, progress=None: engine(s, m, c, progress=pause)
    result = fi.infer_scan_task.fn(store, arg, EngineConfig(tile=(32, 32), output_dtype="float32", batch=2),
                                   replace=True)
    print(result.status, flush=True)
elif kind == "export":  # paused after it read the prediction's record, before any chunk
    import tasks.export.export as ex
    from tasks.export import ExportOptions
    provenance = ex.prov.provenance
    def paused_provenance(*a, **k):
        pause()
        return provenance(*a, **k)
    ex.prov.provenance = paused_provenance
    print(ex.export_scan(store, ExportOptions("tiff", arg)).status, flush=True)
elif kind == "evaluate":  # paused after its first chunk of the prediction
    import tasks.metrics.evaluate as ev
    class Paused(ev.ConfusionMatrix):
        def update(self, ref, pred):
            pause()
            return super().update(ref, pred)
    ev.ConfusionMatrix = Paused
    ev.evaluate_scan(store, labels_path=arg)
    print("evaluated", flush=True)
'''

FORCE = r'''
import sys
import flows.infer as fi
from tasks.engine.infer import EngineConfig
from tasks.errors import ScanError
try:
    r = fi.infer_scan_task.fn(sys.argv[1], sys.argv[2], EngineConfig(tile=(32, 32), output_dtype="float32", batch=2),
                              replace=True)
except ScanError as exc:
    print(f"error: {exc}", file=sys.stderr)
    raise SystemExit(1)
print(r.status)
'''


def _start(tmp_path: Path, kind: str, store: str, arg: str, name: str | None = None) -> tuple[subprocess.Popen, Path]:
    """Start a holder and return once it is paused at its gate."""
    return start_paused(tmp_path, HOLDER, name or kind, kind, store, arg)


def _release(proc: subprocess.Popen, gate: Path) -> str:
    (gate / "go").write_text("1")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out.strip().splitlines()[-1]


def _force(tmp_path: Path, store: str, model: str, **env: str) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, "-c", FORCE, store, model], cwd=ROOT, env=_env(tmp_path, **env),
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


# ---- the shared lock itself, locally and on S3 ---------------------------------------------------

def _attempt(store: str, results: list, **kwargs) -> threading.Thread:
    def run():
        try:
            with storage.store_lock(store, **kwargs):
                results.append("in")
        except Exception as exc:  # noqa: BLE001  (the test looks at what it was)
            results.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.fixture(params=["local", "s3"])
def lock_store(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "scan.zarr")
    s3 = request.getfixturevalue("s3")
    return f"{s3.url}/scan.zarr"


def test_readers_share_the_store_and_exclude_writers(tmp_path, lock_store, monkeypatch):
    monkeypatch.setenv("TILEWISE_LOCK_BRIEF_WAIT", "240")
    holder, gate = _start(tmp_path, "lock", lock_store, json.dumps({"shared": True, "purpose": "export"}))
    # a second reader, at the same time: in at once
    with storage.store_lock(lock_store, wait=0, shared=True, purpose="evaluate"):
        pass
    # a writer: refused at once (wait 0), naming the reading process
    with pytest.raises(storage.StoreBusy, match=rf"another tilewise run \(pid {holder.pid} on .*, export since "):
        with storage.store_lock(lock_store, wait=0, purpose="infer"):
            pytest.fail("a writer got in beside a reader")
    # a brief write (an evaluation's record) waits for the reader instead of failing
    results: list = []
    brief = _attempt(lock_store, results, wait=0, purpose="evaluate", brief=True)
    brief.join(1.0)
    assert results == []  # still waiting: the reader holds the store
    assert _release(holder, gate) == "released"
    brief.join(120)
    assert results == ["in"]


def test_a_writer_excludes_readers_and_a_brief_writer_is_waited_for(tmp_path, lock_store, monkeypatch):
    monkeypatch.setenv("TILEWISE_LOCK_BRIEF_WAIT", "240")
    holder, gate = _start(tmp_path, "lock", lock_store, json.dumps({"purpose": "infer"}), "infer")
    with pytest.raises(storage.StoreBusy, match=rf"\(pid {holder.pid} on .*, infer since "):
        with storage.store_lock(lock_store, wait=0, shared=True, purpose="export"):
            pytest.fail("a reader got in beside a writer")
    results: list = []
    waiter = _attempt(lock_store, results, wait=120, shared=True, purpose="export")  # TILEWISE_LOCK_WAIT
    waiter.join(1.0)
    assert results == []
    assert _release(holder, gate) == "released"
    waiter.join(120)
    assert results == ["in"]

    holder, gate = _start(tmp_path, "lock", lock_store, json.dumps({"purpose": "evaluate", "brief": True}), "brief")
    results = []
    reader = _attempt(lock_store, results, wait=0, shared=True, purpose="export")  # wait 0, yet it waits
    reader.join(1.0)
    assert results == []
    assert _release(holder, gate) == "released"
    reader.join(120)
    assert results == ["in"]


# ---- export and evaluate against infer --force ----------------------------------------------------

@pytest.fixture
def predicted(tmp_path):
    """A predicted scan, a reference copy predicted the same way (no race), the model and labels."""
    array = np.random.default_rng(11).random((1, 192, 192), dtype=np.float32)
    store = make_scan(tmp_path, array, (32, 32), "scan")
    reference = make_scan(tmp_path, array, (32, 32), "reference")
    model = tmp_path / "m.pt"
    torch.jit.script(conv_net(2, 1, 2)).save(str(model))
    config = EngineConfig(tile=(32, 32), output_dtype="float32", batch=2)
    for s in (store, reference):
        infer_scan(s, load_model(str(model)), config)
    labels = tmp_path / "labels.tif"
    truth = (array[0] > 0.5).astype(np.uint8)
    with rasterio.open(labels, "w", driver="GTiff", width=192, height=192, count=1, dtype="uint8") as dst:
        dst.write(truth[None])
    return store, reference, str(model), str(labels)


def _tiff(path: Path) -> np.ndarray:
    return tifffile.imread(path)


def _identity(store: str) -> str:
    from tasks.export.source import open_source

    return open_source(store).prediction_digest()


def test_export_and_evaluate_during_infer_force_say_busy_or_wait_for_the_new_prediction(tmp_path, predicted):
    store, reference, model, labels = predicted
    rc, out, err = _cli(tmp_path, "export", "--store", reference, "--format", "tiff", "--out", str(tmp_path / "ref.ome.tif"))
    assert rc == 0, err
    expected = _tiff(tmp_path / "ref.ome.tif")
    assert expected.any()  # the reference export is not all background

    holder, gate = _start(tmp_path, "infer-force", store, model)  # the old prediction dropped, new half-written
    out_file = tmp_path / "race.ome.tif"
    _assert_busy(*_cli(tmp_path, "export", "--store", store, "--format", "tiff", "--out", str(out_file)),
                 store, "infer", holder.pid)
    assert not out_file.exists()
    _assert_busy(*_cli(tmp_path, "evaluate", "--store", store, "--labels", labels, "--no-mlflow"),
                 store, "infer", holder.pid)
    waiter = _cli(tmp_path, "export", "--store", store, "--format", "tiff", "--out", str(out_file), wait=False,
                  TILEWISE_LOCK_WAIT="240")
    assert waiter.poll() is None
    assert _release(holder, gate) == "inferred"
    wout, werr = waiter.communicate(timeout=300)
    assert waiter.returncode == 0, werr
    np.testing.assert_array_equal(_tiff(out_file), expected)  # what a run without a race writes
    sidecar = json.loads(Path(f"{out_file}.tilewise.json").read_text())
    assert sidecar["prediction_digest"] == _identity(store)  # the new prediction's, not the dropped one's


def test_infer_force_is_refused_while_export_and_evaluate_read(tmp_path, predicted):
    store, reference, model, labels = predicted
    assert _cli(tmp_path, "export", "--store", reference, "--format", "tiff", "--out", str(tmp_path / "ref.ome.tif"))[0] == 0
    expected = _tiff(tmp_path / "ref.ome.tif")
    before = _identity(store)

    out_file = tmp_path / "read.ome.tif"
    exporter, export_gate = _start(tmp_path, "export", store, str(out_file))
    evaluator, evaluate_gate = _start(tmp_path, "evaluate", store, labels)  # two readers at once
    rc, out, err = _force(tmp_path, store, model)
    assert rc == 1 and "Traceback" not in err, (out, err)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert errors[0].startswith(f"error: {store}: 2 other tilewise runs (") and " hold the lock " in errors[0]
    assert f"pid {exporter.pid} on " in errors[0] and f"pid {evaluator.pid} on " in errors[0]
    # both go on (the evaluation's record, a brief write, waits for the export to finish reading)
    (evaluate_gate / "go").write_text("1")
    assert _release(exporter, export_gate) == "exported"
    assert _release(evaluator, evaluate_gate) == "evaluated"
    np.testing.assert_array_equal(_tiff(out_file), expected)
    assert _identity(store) == before  # nothing replaced it under the readers
    assert json.loads(Path(f"{out_file}.tilewise.json").read_text())["prediction_digest"] == before
    record = storage.read_record(f"{store}/prediction")
    assert record["evaluation"]["prediction_digest"] == record["digest"]

    rc, out, err = _force(tmp_path, store, model)  # once they are done, --force goes through
    assert rc == 0 and out.strip() == "inferred", err
    assert _identity(store) != before


def test_a_reader_never_records_marks_it_did_not_read(tmp_path, predicted, monkeypatch):
    """A writer that ignores the lock (an older tilewise, a hand edit) rewrites the prediction while
    an export reads it: the export refuses to put its output in place."""
    from tasks.export import ExportOptions, export_scan, tiff

    store, _, _, _ = predicted
    real = tiff.export_tiff

    def rewrite_then(*args, **kwargs):  # inside the export, while it reads: a new mark on the prediction
        storage.clear_complete(f"{store}/prediction")
        zarr.open_array(f"{store}/prediction/done", mode="r+")[0, 0] = 0
        group = zarr.open_group(f"{store}/prediction", mode="r+")
        storage.mark_complete(group, {"at": "later"}, arrays=("probabilities", "labels", "done"))
        return real(*args, **kwargs)

    monkeypatch.setattr(tiff, "export_tiff", rewrite_then)
    out = tmp_path / "x.ome.tif"
    with pytest.raises(ScanError, match="changed while it was being exported"):
        export_scan(store, ExportOptions("tiff", str(out)))
    assert not out.exists()


# ---- the NGFF labels list around a re-infer ------------------------------------------------------

def _listed(store: str) -> list[str]:
    return list(zarr.open_group(f"{store}/labels", mode="r").attrs.get("ome", {}).get("labels", []))


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("how", ["force", "new-model", "resume"])
def test_labels_are_unlisted_during_a_failed_reinfer_and_listed_after_a_good_one(tmp_path, monkeypatch, how):
    import flows.infer as fi
    from tasks.instances.from_semantic import instances_from_prediction

    array = np.random.default_rng(2).random((1, 96, 96), dtype=np.float32)
    store = make_scan(tmp_path, array, (32, 32), "scan")
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.jit.script(conv_net(2, 1, 2, seed=0)).save(str(first))
    torch.jit.script(conv_net(2, 1, 2, seed=1)).save(str(second))
    config = EngineConfig(tile=(32, 32), output_dtype="float32", batch=2)
    infer_scan(store, load_model(str(first)), config)
    instances_from_prediction(store, method="components", min_size=1)
    assert sorted(_listed(store)) == ["instances", "prediction"]

    engine = fi.infer_scan

    def failing(s, m, c, progress=None):
        def boom(done, total):
            raise _Boom("the model failed mid-run")
        return engine(s, m, c, progress=boom)

    monkeypatch.setattr(fi, "infer_scan", failing)
    uri = str(second if how == "new-model" else first)
    if how == "resume":  # left unfinished, still listed (as code before the unlisting left it): resumed
        storage.clear_complete(f"{store}/prediction")
        zarr.open_array(f"{store}/prediction/done", mode="r+")[0, 0] = 0
    with pytest.raises(_Boom):
        fi.infer_scan_task.fn(store, uri, config, replace=how == "force")
    assert not storage.is_complete(f"{store}/prediction")
    assert _listed(store) == []  # napari shows no mask, rather than the old one

    monkeypatch.setattr(fi, "infer_scan", engine)
    fi.infer_scan_task.fn(store, uri, config, replace=how == "force")
    assert storage.is_complete(f"{store}/prediction")
    assert _listed(store) == ["prediction"]
    np.testing.assert_array_equal(zarr.open_array(f"{store}/labels/prediction/0", mode="r")[:],
                                  zarr.open_array(f"{store}/prediction/labels", mode="r")[:])


def test_a_removal_that_stops_half_way_leaves_nothing_marked_complete(tmp_path, monkeypatch):
    """Files go one by one: whatever of a prediction is left after a crash mid-removal is not
    complete, and neither are its instances (their mark lives in the prediction's record)."""
    from fsspec.implementations.local import LocalFileSystem

    from tasks.instances import store as inst_store
    from tasks.instances.from_semantic import instances_from_prediction

    array = np.random.default_rng(4).random((1, 64, 64), dtype=np.float32)
    store = make_scan(tmp_path, array, (32, 32), "scan")
    model = tmp_path / "m.pt"
    torch.jit.script(conv_net(2, 1, 2)).save(str(model))
    infer_scan(store, load_model(str(model)), EngineConfig(tile=(32, 32), output_dtype="float32", batch=2))
    instances_from_prediction(store, method="components", min_size=1)
    assert storage.is_complete(f"{store}/prediction") and inst_store.instances_complete(store)

    def crash(self, path, recursive=False, maxdepth=None):
        raise OSError("the machine went down mid-removal")

    monkeypatch.setattr(LocalFileSystem, "rm", crash)
    with pytest.raises(OSError, match="mid-removal"):
        storage.remove(f"{store}/prediction")
    assert (Path(store) / "prediction" / "labels").is_dir()  # nothing deleted yet, and yet:
    assert not storage.is_complete(f"{store}/prediction")
    assert not inst_store.instances_complete(store)

"""The engine through its real entry points: the CLI with a TorchScript file (and card), a run
killed with SIGKILL and resumed, and two Dask workers against one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from flows.cli import app
from tasks import storage
from tests.cli_output import without_home
from tests.compare import assert_labels_equal_where_decided
from tasks.engine.distributed import infer_distributed
from tasks.engine.infer import EngineConfig, infer_scan
from tasks.engine.model_io import load_model
from tests.test_engine import conv_net, make_scan, predicted

pytestmark = pytest.mark.slow
runner = CliRunner()


def scripted(net: torch.nn.Module, path: Path) -> Path:
    torch.jit.script(net).save(str(path))
    return path


def test_cli_infer_with_torchscript_file_and_card(tmp_path):
    array = np.random.default_rng(0).random((2, 40, 40), dtype=np.float32) * 10
    store = make_scan(tmp_path, array, (16, 16))
    bare = scripted(conv_net(2, 2, 3), tmp_path / "bare.pt")
    result = runner.invoke(app, ["infer", "--store", store, "--model", str(bare), "--tile", "16,16", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert storage.is_complete(f"{store}/prediction")
    probs = predicted(store)
    assert probs.shape == (3, 40, 40)  # classes from the model's output
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)

    carded = scripted(conv_net(2, 2, 3), tmp_path / "carded.pt")
    card = {"in_channels": 2, "classes": ["bg", "a", "b"], "tile": [16, 16],
            "normalization": {"kind": "zscore", "mean": [5.0, 5.0], "std": [2.0, 2.0]}}
    (tmp_path / "carded.pt.json").write_text(json.dumps(card))
    store2 = make_scan(tmp_path, array, (16, 16), "second")
    result = runner.invoke(app, ["infer", "--store", store2, "--model", str(carded), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert zarr.open_group(f"{store2}/prediction").attrs["tilewise"]["classes"] == ["bg", "a", "b"]
    # the card's normalisation is what the model saw: same as feeding normalised data to the bare path
    store3 = make_scan(tmp_path, (array - 5.0) / 2.0, (16, 16), "normalised")
    infer_scan(store3, load_model(str(bare)), EngineConfig(tile=(16, 16), output_dtype="float32"))
    assert np.abs(predicted(store2) - predicted(store3)).max() <= 1e-5

    bad = runner.invoke(app, ["infer", "--store", store, "--model", str(bare), "--overlap", "1.0"])
    assert bad.exit_code == 1 and "overlap must be in [0, 1)" in bad.output
    missing = runner.invoke(app, ["infer", "--store", store, "--model", str(tmp_path / "nope.pt")])
    assert missing.exit_code == 1 and "nope.pt: model file does not exist" in missing.output


def test_killed_run_resumes_from_written_chunks(tmp_path):
    array = np.random.default_rng(1).random((1, 384, 384), dtype=np.float32)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 48, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(48, 48, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(48, 2, 3, padding=1)).eval()
    model = scripted(net, tmp_path / "m.pt")
    store = make_scan(tmp_path, array, (32, 32), "killed")
    reference = make_scan(tmp_path, array, (32, 32), "reference")
    args = ["--tile", "32,32", "--dtype", "float32", "--batch", "2"]
    infer_scan(reference, load_model(str(model)), EngineConfig(tile=(32, 32), output_dtype="float32", batch=2))

    cmd = [sys.executable, "-m", "flows.cli", "infer", "--store", store, "--model", str(model), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    done_path = Path(store) / "prediction" / "done"
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        if done_path.exists():
            try:
                done = int(zarr.open_array(str(done_path), mode="r")[:].sum())
            except Exception:
                done = 0
            if done >= 3:
                break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed; make the job longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not storage.is_complete(f"{store}/prediction")
    total = int(np.prod(zarr.open_array(str(done_path))[:].shape))
    finished = int(zarr.open_array(str(done_path))[:].sum())
    assert 0 < finished < total

    result = runner.invoke(app, ["infer", "--store", store, "--model", str(model), *args])
    assert result.exit_code == 0, result.output
    lines = without_home(result.output).splitlines()  # the lock taken over from the killed run is said first
    summary = next((line for line in lines if line.startswith("resumed:")), "")
    assert summary, result.output
    total_tiles = 23 * 23  # even placement: ceil((384 - 32) / 16) + 1 tiles per axis
    assert int(summary.split("(")[1].split(" tiles")[0]) < total_tiles
    assert storage.is_complete(f"{store}/prediction")
    assert np.abs(predicted(store) - predicted(reference)).max() <= 1e-5


def test_two_dask_workers_match_one_process(tmp_path):
    array = np.random.default_rng(2).random((1, 32, 48, 40), dtype=np.float32)
    model = scripted(conv_net(3, 1, 2), tmp_path / "m.pt")
    one = make_scan(tmp_path, array, (16, 16, 16), "one")
    two = make_scan(tmp_path, array, (16, 16, 16), "two")
    config = EngineConfig(tile=(16, 16, 16), output_dtype="float32")
    single = infer_scan(one, load_model(str(model)), config)
    spread = infer_distributed(two, str(model), config, "local:2", region_chunks=(1, 2, 2))
    assert spread.status == "inferred" and storage.is_complete(f"{two}/prediction")
    assert spread.tiles >= single.tiles  # halo tiles are computed by both neighbours
    # Same tiles, same order, same weights per chunk: identical up to float32 rounding.
    assert np.abs(predicted(one) - predicted(two)).max() <= 1e-6
    # Labels: equal wherever the two best classes are further apart than that rounding.
    assert_labels_equal_where_decided(zarr.open_array(f"{two}/prediction/labels")[:],
                                      zarr.open_array(f"{one}/prediction/labels")[:], predicted(one), tol=1e-6)

"""Stores written through the zarrs codec pipeline (the default, tasks/codecs.py) are ordinary Zarr
v3: zarr-python's own pipeline, in another process, reads the same values; the codecs written are
the ones asked for; ome-zarr finds the image and the prediction's label image."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import zarr

import tasks.codecs
from tasks.engine.infer import EngineConfig, infer_scan
from tasks.engine.model_io import LoadedModel, ModelCard
from tests.test_engine import conv_net, make_scan

REPO = Path(__file__).resolve().parents[1]
ARRAYS = ("image/0", "image/1", "prediction/probabilities", "prediction/labels", "labels/prediction/0",
          "labels/prediction/1")

READ = """
import hashlib, json, sys
import tasks.codecs, zarr
store, names = sys.argv[1], json.loads(sys.argv[2])
out = {"pipeline": tasks.codecs.PIPELINE}
for name in names:
    a = zarr.open_array(f"{store}/{name}", mode="r")
    out[name] = hashlib.sha256(a[...].tobytes()).hexdigest()
print(json.dumps(out))
"""


def _digests(store: str, pipeline: str) -> dict:
    env = {**os.environ, "TILEWISE_ZARR_PIPELINE": pipeline, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", READ, store, json.dumps(ARRAYS)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_zarrs_is_the_pipeline_and_what_it_writes_zarr_python_reads_alike(tmp_path):
    assert tasks.codecs.PIPELINE == "zarrs"
    assert type(zarr.create_array(store=str(tmp_path / "probe.zarr"), shape=(4,), dtype="u1")
                ._async_array.codec_pipeline).__name__ == "ZarrsCodecPipeline"
    array = np.random.default_rng(9).random((2, 150, 133), dtype=np.float32)
    store = make_scan(tmp_path, array, (32, 32))
    infer_scan(store, LoadedModel(conv_net(2, 2, 3), ModelCard(), "m"), EngineConfig(tile=(32, 32)))

    by_zarrs, by_python = _digests(store, "zarrs"), _digests(store, "zarr-python")
    assert (by_zarrs.pop("pipeline"), by_python.pop("pipeline")) == ("zarrs", "zarr-python")
    assert by_zarrs == by_python
    np.testing.assert_array_equal(zarr.open_array(f"{store}/image/0")[...], array)

    # the codecs asked for, in the metadata every reader follows
    for name, shuffle in (("prediction/probabilities", "shuffle"), ("prediction/labels", "bitshuffle"),
                          ("labels/prediction/1", "bitshuffle")):
        codecs = json.loads((Path(store) / name / "zarr.json").read_text())["codecs"]
        blosc = [c for c in codecs if c["name"] == "blosc"]
        assert len(blosc) == 1, codecs
        assert blosc[0]["configuration"]["cname"] == "zstd" and blosc[0]["configuration"]["shuffle"] == shuffle


def test_ome_zarr_reads_a_store_written_through_zarrs(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    array = np.random.default_rng(10).random((1, 96, 80), dtype=np.float32)
    store = make_scan(tmp_path, array, (32, 32))
    infer_scan(store, LoadedModel(conv_net(2, 1, 3), ModelCard(), "m"), EngineConfig(tile=(32, 32)))
    nodes = list(Reader(parse_url(store))())
    np.testing.assert_array_equal(np.asarray(nodes[0].data[0]).reshape(array.shape), array)
    labels = [n for n in nodes if "image-label" in n.zarr.root_attrs.get("ome", n.zarr.root_attrs)]
    assert len(labels) == 1
    np.testing.assert_array_equal(np.asarray(labels[0].data[0]).reshape(array.shape[1:]),
                                  zarr.open_array(f"{store}/prediction/labels")[...])

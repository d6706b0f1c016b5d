"""A distributed run has one writer of the output's identity: the driver. Workers load the version
the driver resolved and refuse, without touching anything, when their model gives another digest
(issue 11: a worker resolving an alias itself, or seeing another file at the path, used to delete
the prediction the others were writing)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import zarr

from tasks import storage
from tasks.engine import distributed
from tasks.engine.infer import EngineConfig, prepare
from tasks.engine.model_io import load_model
from tasks.errors import ScanError
from tests.test_engine import conv_net, make_scan
from tests.test_engine_e2e import scripted


class InProcessClient:
    """Runs submitted jobs in this process and records what was submitted."""

    def __init__(self):
        self.submitted = []

    def submit(self, fn, *args, pure=True):
        self.submitted.append(args)
        return fn, args

    def gather(self, futures):
        return [fn(*args) for fn, args in futures]


@pytest.fixture(autouse=True)
def _fresh_worker_cache():
    distributed._worker_model.cache_clear()
    yield
    distributed._worker_model.cache_clear()


def test_workers_get_the_resolved_version_and_the_drivers_digest(tmp_path, monkeypatch):
    array = np.random.default_rng(0).random((1, 16, 32, 32), dtype=np.float32)
    store = make_scan(tmp_path, array, (16, 16, 16), "s")
    path = scripted(conv_net(3, 1, 2), tmp_path / "m.pt")
    version = dataclasses.replace(load_model(str(path)), identity="models:/brain/3")
    resolved = []
    monkeypatch.setattr(distributed, "load_model", lambda uri: version)
    monkeypatch.setattr(distributed, "_worker_model", lambda uri: resolved.append(uri) or version)
    client = InProcessClient()
    config = EngineConfig(tile=(16, 16, 16), output_dtype="float32")
    result = distributed.infer_distributed(store, "models:/brain@champion", config, client=client,
                                           region_chunks=(1, 1, 1))
    assert result.status == "inferred" and storage.is_complete(f"{store}/prediction")
    digest = storage.read_record(f"{store}/prediction")["digest"]
    assert {args[1] for args in client.submitted} == {"models:/brain/3"} and set(resolved) == {"models:/brain/3"}
    assert {args[4] for args in client.submitted} == {digest}


def test_a_worker_with_another_model_refuses_and_leaves_the_prediction(tmp_path):
    array = np.random.default_rng(1).random((1, 16, 32, 32), dtype=np.float32)
    store = make_scan(tmp_path, array, (16, 16, 16), "s")
    path = scripted(conv_net(3, 1, 2), tmp_path / "m.pt")
    config = EngineConfig(tile=(16, 16, 16), output_dtype="float32")
    prep = prepare(store, load_model(str(path)), config)  # the driver creates the output
    before = storage.read_record(f"{store}/prediction")
    torch_seed_other = conv_net(3, 1, 2)
    for p in torch_seed_other.parameters():
        p.data.add_(1.0)
    scripted(torch_seed_other, path)  # another file at the same path, as a worker may see it
    chunk = next(iter(prep.todo))
    with pytest.raises(ScanError, match="another model version or file"):
        distributed._run_region(store, str(path), config, [chunk], prep.digest)
    assert storage.read_record(f"{store}/prediction") == before
    assert not zarr.open_array(f"{store}/prediction/done")[:].any()


def test_a_worker_never_recreates_a_missing_output(tmp_path):
    array = np.random.default_rng(2).random((1, 16, 32, 32), dtype=np.float32)
    store = make_scan(tmp_path, array, (16, 16, 16), "s")
    path = scripted(conv_net(3, 1, 2), tmp_path / "m.pt")
    config = EngineConfig(tile=(16, 16, 16), output_dtype="float32")
    prep = prepare(store, load_model(str(path)), config)
    storage.remove(f"{store}/prediction")
    with pytest.raises(ScanError, match="not replacing it"):
        distributed._run_region(store, str(path), config, [next(iter(prep.todo))], prep.digest)
    assert not storage.exists(f"{store}/prediction")

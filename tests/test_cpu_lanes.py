"""A batch split over two lanes on a CPU (``tasks.engine.runner.Lanes``): the parts run at once, each
on half of torch's threads, always of the same size (a tile's logits do not depend on its batch),
come back in order, and the engine writes what one lane writes."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
import zarr

from tasks.engine.infer import EngineConfig, infer_scan
from tasks.engine.model_io import LoadedModel, ModelCard
from tasks.engine.runner import CPU_LANES_ENV, Lanes, ModelRunner, cpu_lanes
from tests.test_engine import conv_net, make_scan


class _Recorder(torch.nn.Module):
    """Scales its input by 2; records when each call ran, in which thread, with how many threads and
    tiles, and holds the call 0.2 s (a sleep releases the GIL, as a forward's kernels do)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[float, float, int, int, int]] = []
        self._lock = threading.Lock()

    def forward(self, x):
        t0 = time.perf_counter()
        threads = torch.get_num_threads()
        time.sleep(0.2)
        with self._lock:
            self.calls.append((t0, time.perf_counter(), threading.get_ident(), threads, len(x)))
        return torch.cat([x, 2 * x], 1)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_two_lanes_split_a_batch_into_equal_parts_over_half_the_threads_each_and_keep_its_order(two_threads):
    net = _Recorder()
    runner = ModelRunner(net, device="cpu")
    batches = [np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1) * np.ones((1, 1, 4, 4), np.float32)
               for n in (4, 3, 1)]
    with Lanes(runner, 2, batch=4) as lanes:
        results = [lanes.run(b) for b in batches]
    for b, out in zip(batches, results):  # each tile's own logits, in the batch's order, no filler
        assert out.shape == (len(b), 2, 4, 4)
        np.testing.assert_array_equal(out[:, 1], 2 * b[:, 0])
    assert threading.get_ident() not in {c[2] for c in net.calls}  # every part in a lane
    assert [c[4] for c in net.calls] == [2] * 5  # 4 = 2 + 2, 3 = 2 + (1 and a copy), 1 = (1 and a copy)
    intervals = sorted((a, b) for a, b, *_ in net.calls)[:4]  # the two batches of several tiles
    assert all(y[0] < x[1] for x, y in zip(intervals[::2], intervals[1::2])), intervals  # parts at once
    assert len({c[2] for c in net.calls}) == 2
    assert {c[3] for c in net.calls} == {1}  # 2 threads shared by 2 lanes
    assert torch.get_num_threads() == 2  # restored
    assert runner.calls == 8  # the copies are not counted


class _Sleeper(torch.nn.Module):
    """Holds each call as many seconds as its first tile's first value; records (start, end, value)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[float, float, float]] = []
        self._lock = threading.Lock()

    def forward(self, x):
        t0 = time.perf_counter()
        time.sleep(float(x[0, 0, 0, 0]))
        with self._lock:
            self.calls.append((t0, time.perf_counter(), float(x[0, 0, 0, 0])))
        return torch.cat([x, -x], 1)


def test_a_lane_goes_on_with_the_next_batch_while_the_other_finishes_this_one(two_threads):
    """Batches queued behind each other: a part slowed down (here held 0.6 s) does not idle the
    other lane until the batch's end; it runs the next batch's parts meanwhile."""
    net = _Sleeper()
    runner = ModelRunner(net, device="cpu")
    first = np.array([0.6, 0.6, 0.05, 0.05], np.float32).reshape(4, 1, 1, 1) * np.ones((1, 1, 2, 2), np.float32)
    second = np.full((4, 1, 2, 2), 0.05, np.float32)
    with Lanes(runner, 2, batch=4) as lanes:
        assert lanes.depth == 2
        queued = [lanes.submit(first), lanes.submit(second)]
        out = [q.result() for q in queued]
    np.testing.assert_array_equal(out[0][:, 1], -first[:, 0])
    np.testing.assert_array_equal(out[1][:, 1], -second[:, 0])
    slow = next(c for c in net.calls if c[2] > 0.5)
    others = [c for c in net.calls if c is not slow]
    # the slow part's partner and both of the next batch's parts ran beside it, on the other lane
    assert len(others) == 3 and all(c[1] <= slow[1] for c in others), net.calls


def test_a_tiles_logits_do_not_depend_on_the_batch_it_fell_in(two_threads):
    """Nodata tiles skipped, a region or a stripe's end change which tiles share a batch and how many
    there are: the tile's logits stay the same to the bit (a one-thread forward rounds by the batch's
    size; lanes of a fixed size are filled with copies)."""
    net = conv_net(3, 1, 2)
    tiles = np.random.default_rng(0).random((5, 1, 16, 24, 24), dtype=np.float32)
    runner = ModelRunner(net, device="cpu")
    with Lanes(runner, 2, batch=4) as lanes:
        full = lanes.run(tiles[:4])
        for batch in ([tiles[0]], [tiles[4], tiles[0]], [tiles[2], tiles[4], tiles[0]]):
            np.testing.assert_array_equal(lanes.run(np.stack(batch))[-1], full[0])


def test_one_lane_runs_in_the_calling_thread_and_a_failure_reaches_the_result(two_threads):
    """(With two lanes the NaN check runs in a lane: the engine's bad-output tests cover it.)"""
    net = _Recorder()
    runner = ModelRunner(net, device="cpu")
    with Lanes(runner, 1, batch=4) as lanes:
        lanes.run(np.zeros((3, 1, 4, 4), np.float32))
        with pytest.raises(Exception, match="NaN or Inf"):
            lanes.run(np.full((3, 1, 4, 4), np.nan, np.float32))
    assert {c[2] for c in net.calls} == {threading.get_ident()}


def test_lanes_only_where_they_help(two_threads, monkeypatch):
    runner = ModelRunner(torch.nn.Identity(), device="cpu")
    monkeypatch.delenv(CPU_LANES_ENV, raising=False)
    assert cpu_lanes(runner, 4) == 2  # the default on two or more threads
    assert cpu_lanes(runner, 1) == 1  # a batch of one tile: nothing to split
    monkeypatch.setenv(CPU_LANES_ENV, "1")
    assert cpu_lanes(runner, 4) == 1
    monkeypatch.setenv(CPU_LANES_ENV, "8")
    assert cpu_lanes(runner, 8) == 2  # never more lanes than threads
    monkeypatch.delenv(CPU_LANES_ENV)
    torch.set_num_threads(1)
    assert cpu_lanes(runner, 4) == 1


@pytest.mark.parametrize("shape, chunks, tile", [
    pytest.param((2, 70, 90), (32, 32), (24, 24), id="2d"),
    pytest.param((1, 20, 30, 26), (8, 16, 16), (8, 12, 12), id="3d"),
])
def test_engine_with_two_lanes_writes_what_one_lane_writes(tmp_path, monkeypatch, two_threads, shape, chunks, tile):
    """The blend order is the batches' order whatever lane ran them: the same probabilities (to the
    float rounding of a forward on one thread against two) and the same labels."""
    rng = np.random.default_rng(5)
    array = rng.random(shape, dtype=np.float32)
    net = conv_net(len(shape) - 1, shape[0], 3)
    out = {}
    for lanes in ("1", "2"):
        monkeypatch.setenv(CPU_LANES_ENV, lanes)
        (tmp_path / lanes).mkdir()
        store = make_scan(tmp_path / lanes, array, chunks)
        config = EngineConfig(tile=tile, overlap=0.5, output_dtype="float32", batch=2, device="cpu")
        result = infer_scan(store, LoadedModel(net, ModelCard(), "net"), config)
        assert result.status == "inferred"
        out[lanes] = (zarr.open_array(f"{store}/prediction/probabilities")[:],
                      zarr.open_array(f"{store}/prediction/labels")[:])
    np.testing.assert_allclose(out["2"][0], out["1"][0], atol=1e-6)
    decided = np.sort(out["1"][0], axis=0)
    clear = decided[-1] - decided[-2] > 1e-5  # not a near-tie between the two best classes
    np.testing.assert_array_equal(out["2"][1][clear], out["1"][1][clear])

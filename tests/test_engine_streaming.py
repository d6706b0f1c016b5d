"""The engine streams its tiles: no list of every tile, no table of every chunk (issue 21's 16 GiB run
held 451k tile origins and per-chunk tables, 2.9x the memory of the 1 GiB run).

The per-chunk counts it computes instead, as products of per-axis counts, are checked against brute
force over every tile (numpy's own ``reflect`` padding for the voxels a border tile reads); each
input chunk is decoded once, counted by a proxy in front of the Zarr array, not by the engine.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.engine import infer
from tasks.engine.infer import EngineConfig, infer_scan
from tasks.engine.model_io import LoadedModel, ModelCard
from tasks.engine.plan import plan_tiles
from tasks.engine.tiles import ChunkCache, source_reads
from tests.test_engine import make_scan, predicted

PLANS = [  # shape, tile, overlap, chunks, placement
    ((40, 50), (16, 16), 0.5, (8, 12), "even"),
    ((40, 50), (16, 16), 0.25, (16, 16), "monai"),
    ((10, 33, 47), (12, 16, 16), 0.5, (4, 8, 16), "even"),  # the first axis shorter than the tile: padded
    ((7, 64, 64), (1, 16, 16), 0.25, (1, 32, 32), "even"),  # a 2D net over a stack
]


def tile_boxes(plan):
    """Every tile as per-axis [lo, hi) in scan coordinates (may leave the scan)."""
    for start in itertools.product(*plan.starts):
        yield [(s - p, s - p + t) for s, p, t in zip(start, plan.pad_before, plan.tile)]


@pytest.mark.parametrize("shape, tile, overlap, chunks, placement", PLANS)
def test_tiles_in_chunk_equals_counting_every_tile_over_every_chunk(shape, tile, overlap, chunks, placement):
    plan = plan_tiles(shape, tile, overlap, chunks, placement)
    grid = plan.chunk_grid
    expected = np.zeros(grid, dtype=int)
    for box in tile_boxes(plan):
        for index in np.ndindex(*grid):
            if all(max(lo, i * c) < min(hi, (i + 1) * c, n)
                   for (lo, hi), i, c, n in zip(box, index, chunks, shape)):
                expected[index] += 1
    got = np.array([plan.tiles_in_chunk(i) for i in np.ndindex(*grid)]).reshape(grid)
    assert np.array_equal(got, expected)
    assert expected.min() > 0


@pytest.mark.parametrize("mode", ["reflect", "constant"])
@pytest.mark.parametrize("shape, tile, overlap, chunks, placement", PLANS)
def test_source_reads_equal_the_chunks_each_tile_reads_by_numpy_padding(shape, tile, overlap, chunks, placement,
                                                                         mode):
    plan = plan_tiles(shape, tile, overlap, chunks, placement)
    grid = tuple(-(-n // c) for n, c in zip(shape, chunks))
    expected = np.zeros(grid, dtype=int)
    for box in tile_boxes(plan):
        touched = []
        for (lo, hi), n, c in zip(box, shape, chunks):
            pad = max(-lo, hi - n, 0)
            if mode == "reflect":  # numpy's reflect: the source voxel of every position of the tile
                source = np.pad(np.arange(n), pad, mode="reflect")[lo + pad: hi + pad]
            else:  # zeros outside: only the voxels inside are read
                source = np.arange(max(lo, 0), min(hi, n))
            touched.append(np.unique(source // c))
        for index in itertools.product(*touched):
            expected[index] += 1
    uses, needed = source_reads(plan, chunks, mode)
    got = np.array([uses((0, *i)) for i in np.ndindex(*grid)]).reshape(grid)
    assert np.array_equal(got, expected)
    assert needed == int((expected > 0).sum())


class CountingArray:
    """A Zarr array seen through a proxy that records every box read from it."""

    def __init__(self, array, boxes: list):
        self.array, self.boxes = array, boxes
        self.shape, self.chunks, self.dtype = array.shape, array.chunks, array.dtype

    def __getitem__(self, box):
        self.boxes.append(tuple((s.start, s.stop) for s in box))
        return self.array[box]


class _TwoLogits(torch.nn.Module):
    def forward(self, x):
        return torch.cat([x, -x], 1)


def two_logits():
    return LoadedModel(_TwoLogits(), ModelCard(classes=["a", "b"]), "two-logits")


@pytest.mark.parametrize("config", [
    EngineConfig(tile=(8, 16, 16), overlap=0.5, output_dtype="float32"),  # each voxel in 8 tiles
    EngineConfig(tile=(8, 16, 16), overlap=0.5, output_dtype="float32", pad="constant", placement="monai"),
])
def test_each_input_chunk_is_decoded_once_and_the_result_says_so(tmp_path, monkeypatch, config):
    array = np.random.default_rng(3).random((1, 20, 40, 44), dtype=np.float32)
    store = make_scan(tmp_path, array, (4, 8, 8), "s")
    boxes: list = []

    class Counting(ChunkCache):
        def __init__(self, array, budget_bytes):
            super().__init__(CountingArray(array, boxes), budget_bytes)

    monkeypatch.setattr(infer, "ChunkCache", Counting)
    result = infer_scan(store, two_logits(), config)
    chunks_in_scan = 5 * 5 * 6  # 20/4, 40/8, ceil(44/8)
    assert len(boxes) == len(set(boxes)) == chunks_in_scan
    assert (result.input_chunks_decoded, result.input_chunks_needed) == (chunks_in_scan, chunks_in_scan)
    monkeypatch.undo()
    listed = make_scan(tmp_path, array, (4, 8, 8), "listed")  # the same run through the listed path (a region)
    prep = infer.prepare(listed, two_logits(), config)
    part = infer.run_chunks(prep, two_logits(), set(prep.todo))
    infer.finish(prep, {})
    assert (part.input_chunks_decoded, part.input_chunks_needed) == (chunks_in_scan, chunks_in_scan)
    assert np.array_equal(predicted(store), predicted(listed))


BOOKKEEPING = EngineConfig(tile=(1, 16, 16), overlap=0.5, output_dtype="float32", batch=64)


def test_bookkeeping_does_not_grow_with_the_number_of_tiles(tmp_path):
    """A 2D net over a stack: 16x the sections, 16x the tiles and chunks, the same traced peak
    (within 10 %) of a whole run (prepare, tiles, label pyramid, marks). Before, the tiles were listed
    and the chunks tabled before the run, and the done marks read chunk by chunk: 2.1x. Measured in a
    fresh process: tracemalloc counts every thread's allocations, and earlier tests leave threads."""
    stores = {}
    for depth in (16, 256):
        array = np.random.default_rng(5).random((1, depth, 64, 64), dtype=np.float32)
        stores[depth] = make_scan(tmp_path, array, (2, 32, 32), f"d{depth}")  # pyramid blocks (2, 2, 2) in chunks
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, __file__, *stores.values()], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    tiles, peaks = [m["tiles"] for m in measured], [m["peak"] for m in measured]
    assert tiles == [16 * 7 * 7, 256 * 7 * 7]
    assert peaks[1] <= 1.1 * peaks[0], peaks


def _traced_peaks(stores: list[str]) -> list[dict]:
    """Each store inferred in turn (this process), with the traced peak above what was allocated before."""
    out = []
    for store in stores:
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            result = infer_scan(store, two_logits(), BOOKKEEPING)
            out.append({"tiles": result.tiles, "peak": tracemalloc.get_traced_memory()[1] - base})
        finally:
            tracemalloc.stop()
    return out


if __name__ == "__main__":  # test_bookkeeping_does_not_grow_with_the_number_of_tiles's measurement
    print(json.dumps(_traced_peaks(sys.argv[1:])))

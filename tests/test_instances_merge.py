"""Tiling invariance of the instance merge (tasks/instances/merge.py): with a deterministic per-tile
model, the tiled result equals the result of one tile covering the whole scene -- same number of
objects, each mask identical -- for several tile sizes, overlaps, placements and scene offsets; and
only unfinished objects are held."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.engine.plan import plan_tiles
from tasks.instances.merge import Detection, TileMerger


def scene(shape=(300, 260), shift=(0, 0), seed=0) -> np.ndarray:
    """Instance ids (0 = background): blobs across tile borders and corners, a long bar wider than
    any overlap, an L and a U (non-convex), two touching rectangles, a one-pixel object."""
    ids = np.zeros(shape, np.int32)
    rng = np.random.default_rng(seed)
    n = 1
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for _ in range(25):
        cy, cx, r = rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.integers(3, 14)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        ids[disk & (ids == 0)] = n
        n += 1
    dy, dx = shift
    ids[100 + dy: 106 + dy, 5 + dx: 250 + dx] = n; n += 1                       # bar across every tile
    ids[20 + dy: 90 + dy, 200 + dx: 206 + dx] = n; ids[84 + dy: 90 + dy, 150 + dx: 206 + dx] = n; n += 1  # L
    ids[200 + dy: 280 + dy, 30 + dx: 36 + dx] = n; ids[200 + dy: 280 + dy, 90 + dx: 96 + dx] = n     # U
    ids[274 + dy: 280 + dy, 30 + dx: 96 + dx] = n; n += 1
    ids[150 + dy: 170 + dy, 120 + dx: 140 + dx] = n; n += 1                      # touching pair
    ids[150 + dy: 170 + dy, 140 + dx: 160 + dx] = n; n += 1
    ids[5, 5] = n
    return ids


def perfect_model(ids: np.ndarray, origin, tile) -> list[Detection]:
    """What a perfect detector sees in the tile at ``origin``: one mask per object visible in it."""
    crop = np.zeros(tile, np.int32)
    lo = [max(o, 0) for o in origin]
    hi = [min(o + t, n) for o, t, n in zip(origin, tile, ids.shape)]
    crop[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, origin))] = ids[tuple(slice(a, b) for a, b in zip(lo, hi))]
    return [Detection(crop == v, score=1.0 - v / 1000, label=1 + v % 3) for v in np.unique(crop) if v]


def run(ids, tile, overlap, placement="even", chunks=None):
    plan = plan_tiles(ids.shape, tile, overlap, chunks or ids.shape, placement)
    merger = TileMerger(plan)
    out = []
    for origin in plan.tiles():
        out += merger.add(origin, perfect_model(ids, origin, plan.tile))
    out += merger.finish()
    return out, merger


def as_label_image(instances, shape) -> np.ndarray:
    image = np.zeros(shape, np.int32)
    for k, inst in enumerate(instances, start=1):
        box = tuple(slice(a, b) for a, b in zip(inst.lo, inst.hi))
        assert not (image[box][inst.mask]).any(), "instances overlap"
        image[box][inst.mask] = k
    return image


def same_objects(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to renumbering: a one-to-one map between the ids of a and b (background to background)."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1] and len(np.unique(pairs[1])) == pairs.shape[1], \
        "an object of one image is split or merged in the other"
    assert ((pairs[0] == 0) == (pairs[1] == 0)).all()


@pytest.mark.parametrize("tile", [(64, 64), (96, 80), (128, 128)])
@pytest.mark.parametrize("overlap", [0.25, 0.5])
@pytest.mark.parametrize("shift, placement", [((0, 0), "even"), ((3, 7), "even"), ((5, 2), "monai")])
def test_tiled_result_equals_the_whole_image_result(tile, overlap, shift, placement):
    ids = scene(shift=shift, seed=sum(tile) + int(overlap * 4))
    whole, _ = run(ids, ids.shape, 0.0)  # one tile covering the scene
    tiled, merger = run(ids, tile, overlap, placement)
    assert len(tiled) == len(whole) == len(np.unique(ids)) - 1
    same_objects(as_label_image(tiled, ids.shape), as_label_image(whole, ids.shape))
    same_objects(as_label_image(tiled, ids.shape), ids)
    by_mask = {inst.mask.tobytes() + bytes(str(inst.lo), "ascii"): inst for inst in whole}
    for inst in tiled:  # each mask identical, with the whole-image score and class
        twin = by_mask[inst.mask.tobytes() + bytes(str(inst.lo), "ascii")]
        assert (inst.score, inst.label) == (twin.score, twin.label)
    assert merger.large_instances >= 2  # the bar and the L are wider than any overlap: merged whole, counted


def test_only_unfinished_objects_are_held():
    rng = np.random.default_rng(1)
    ids = np.zeros((2000, 2000), np.int32)
    for v, (y, x) in enumerate(rng.integers(0, 1990, size=(400, 2)), start=1):
        ids[y: y + 8, x: x + 8][ids[y: y + 8, x: x + 8] == 0] = v
    tiled, merger = run(ids, (128, 128), 0.5)
    assert len(tiled) == len(np.unique(ids)) - 1
    assert merger.peak_open < len(tiled) / 5, (merger.peak_open, len(tiled))
    assert merger.open_count == 0


def test_depth_one_tiles_over_a_stack_give_per_section_objects():
    ids2d = scene((120, 100))
    stack = np.stack([ids2d, np.where(ids2d > 0, ids2d + 100, 0), np.zeros_like(ids2d)])
    tiled, _ = run(stack, (1, 48, 48), 0.5)
    # tiles of different sections never overlap: every object is one section deep
    assert all(inst.mask.shape[0] == 1 for inst in tiled)
    assert len(tiled) == 2 * (len(np.unique(ids2d)) - 1)
    same_objects(as_label_image(tiled, stack.shape), stack)


def test_no_detections_and_pieces_outside_the_scan():
    ids = np.zeros((70, 50), np.int32)
    tiled, merger = run(ids, (32, 32), 0.5)
    assert tiled == [] and merger.peak_open == 0
    # a scene smaller than the tile: the plan pads, padded pixels are dropped
    ids[10:20, 10:20] = 1
    small, _ = run(ids, (96, 96), 0.5)
    assert len(small) == 1 and small[0].lo == (10, 10) and small[0].mask.shape == (10, 10) and small[0].mask.all()


def test_tiles_out_of_order_are_refused():
    plan = plan_tiles((100, 100), (64, 64), 0.5, (100, 100))
    merger = TileMerger(plan)
    origins = list(plan.tiles())
    with pytest.raises(ValueError, match="plan order"):
        merger.add(origins[1], [])

"""Which tiles have no signal: a tile whose whole input is empty is not run through the network.

Real scans are mostly empty: MRI background outside the head, satellite nodata outside the swath,
EM borders. A voxel is *empty* when every channel equals its channel's empty value -- the source's
declared nodata (GeoTIFF, per band; NaN matches NaN), a background value from the catalog
(``tiling.skip_empty``), or ``corner``: each channel's value at the scan's first voxel (the constant
background of skull-stripped, z-scored MRI differs per subject and per channel). Padding outside
the scan is empty too: a tile sees nothing else.

The decision costs almost nothing. It is made on the pyramid's lowest level first: a level-L voxel
is the mean of its block of level-0 voxels, so a block that is all one value averages to that value,
and a level-L voxel that is *not* empty proves that its block holds a voxel that is not either.
A tile whose box touches such a block is run straight away (conservatively: the voxel may lie in the
part of the block outside the tile). Only a tile whose every level-L voxel looks empty
is checked at level 0 (a mean can hide a few voxels: integer rounding, NaN), and only that tile is
skipped when all its level-0 voxels are empty. A skipped tile's voxels that no run tile covers are
background with probability 1 (the engine's writer); elsewhere the run tiles alone are blended.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from tasks.engine.plan import TilePlan

Origin = tuple[int, ...]
SkipSetting = str | float | None  # "auto" | "off" | "corner" | a background value


@dataclass(frozen=True)
class EmptyRule:
    """A voxel is empty when channel c equals ``values[c]`` for every c (NaN equals NaN)."""

    values: tuple[float, ...]
    source: str  # "nodata" (declared by the source) | "background" (the catalog's value) | "corner"

    def record(self) -> dict:
        return {"source": self.source, "values": [v if not math.isnan(v) else "NaN" for v in self.values]}

    def empty(self, block: np.ndarray) -> np.ndarray:
        """(C, *spatial) → (*spatial) bool: True where every channel holds its empty value."""
        out = np.ones(block.shape[1:], dtype=bool)
        for channel, value in zip(block, self.values):
            out &= np.isnan(channel) if math.isnan(value) else (channel == value)
        return out

    def maybe_empty(self, coarse: np.ndarray) -> np.ndarray:
        """``empty`` for a pyramid level: block means of empty voxels may miss the value by a rounding
        error (float32 sums), so anything that close may be empty; only a clear difference proves
        that the block holds a non-empty voxel."""
        out = np.ones(coarse.shape[1:], dtype=bool)
        for channel, value in zip(coarse, self.values):
            if math.isnan(value):
                out &= np.isnan(channel)
            else:
                out &= np.abs(channel.astype(np.float64) - value) <= 1e-5 * max(abs(value), 1.0)
        return out


def resolve_rule(setting: SkipSetting, record: dict, channels: int, image=None) -> EmptyRule | None:
    """The rule a run uses: ``"auto"`` the source's nodata when every channel declares one (else none),
    ``"off"`` / None none, ``"corner"`` the values of ``image`` (C, *spatial) at its first voxel, a
    number that background value on every channel."""
    if setting is None or setting == "off":
        return None
    if setting == "corner":
        corner = np.asarray(image[(slice(None),) + (0,) * (image.ndim - 1)], dtype=np.float64)
        return EmptyRule(tuple(float(v) for v in corner), "corner")
    if setting == "auto":
        declared = (record.get("spatial") or {}).get("nodata") or []
        if len(declared) != channels or any(v is None for v in declared):
            return None
        return EmptyRule(tuple(float(v) for v in declared), "nodata")
    if isinstance(setting, str):
        raise ValueError(f"skip_empty must be auto, off, corner or a number, got {setting!r}")
    return EmptyRule((float(setting),) * channels, "background")


def valid_region(group, rule: EmptyRule, read: Callable[[tuple[slice, ...]], np.ndarray],
                 chunks: tuple[int, ...]) -> tuple[tuple[int, int], ...] | None:
    """The exact bounding box of the scan's non-empty voxels, per spatial axis [lo, hi); None when
    every voxel is empty. Level 0 decides, chunk by chunk; the lowest pyramid level spares most reads:
    a clearly non-empty coarse voxel proves a non-empty voxel in its block, so the box reaches at
    least into the outermost such blocks, and no chunk lying inside the box of those blocks shrunk by
    one block per side can hold an extreme voxel. ``chunks``: level-0 spatial chunks; ``read`` reads
    (C, *box) of level 0."""
    coarse, factors = _lowest_level(group)
    shape = tuple(group["image/0"].shape[1:])
    inner = None  # chunks wholly inside it need no read
    if coarse is not None:
        hits = np.nonzero(~rule.maybe_empty(coarse))
        if hits[0].size:
            inner = [(int(i.min()) * f + f, int(i.max()) * f) for i, f in zip(hits, factors)]
    lo, hi = list(shape), [0] * len(shape)
    for index in itertools.product(*(range(-(-n // c)) for n, c in zip(shape, chunks))):
        box = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, chunks, shape))
        if inner is not None and all(b.start >= a and b.stop <= z for b, (a, z) in zip(box, inner)):
            continue
        found = np.nonzero(~rule.empty(read((slice(None),) + box)))
        for axis, (idx, b) in enumerate(zip(found, box)):
            if idx.size:
                lo[axis] = min(lo[axis], b.start + int(idx.min()))
                hi[axis] = max(hi[axis], b.start + int(idx.max()) + 1)
    if any(a >= z for a, z in zip(lo, hi)):
        return None
    return tuple(zip(lo, hi))


@dataclass
class SkipDecision:
    skipped: set[Origin] = field(default_factory=set)
    checked_at_level0: int = 0  # tiles the lowest level could not clear
    seconds: float = 0.0


def _lowest_level(group) -> tuple[np.ndarray | None, tuple[int, ...]]:
    """The smallest pyramid level of the scan's image: its voxels (C, *spatial) in memory (None
    without a pyramid) and its factor per spatial axis from level 0 (OME-NGFF scales)."""
    datasets = group.attrs.get("ome", {}).get("multiscales", [{}])[0].get("datasets") or []
    if len(datasets) < 2:
        return None, ()
    first, last = datasets[0], datasets[-1]
    scale0 = first["coordinateTransformations"][0]["scale"][1:]
    scale = last["coordinateTransformations"][0]["scale"][1:]
    factors = tuple(int(round(s / s0)) for s, s0 in zip(scale, scale0))
    return np.asarray(group[last["path"]][...]), factors


def find_empty_tiles(group, plan: TilePlan, origins: Iterable[Origin], rule: EmptyRule,
                     read: Callable[[tuple[slice, ...]], np.ndarray]) -> SkipDecision:
    """The tiles among ``origins`` whose input is all empty under ``rule``. ``group`` is the scan group
    (its ``image`` pyramid); ``read(box)`` reads level 0 (C, *box), e.g. the engine's chunk cache."""
    t0 = time.perf_counter()
    coarse, factors = _lowest_level(group)
    coarse_empty = rule.maybe_empty(coarse) if coarse is not None else None
    decision = SkipDecision()
    for origin in origins:
        lo = [max(o, 0) for o in origin]
        hi = [min(o + t, n) for o, t, n in zip(origin, plan.tile, plan.shape)]
        if coarse_empty is not None:
            box = tuple(slice(a // f, -(-b // f)) for a, b, f in zip(lo, hi, factors))
            if not coarse_empty[box].all():
                continue  # a non-empty coarse voxel proves a non-empty voxel in its block
        decision.checked_at_level0 += 1
        block = read((slice(None),) + tuple(slice(a, b) for a, b in zip(lo, hi)))
        if rule.empty(block).all():
            decision.skipped.add(tuple(origin))
    decision.seconds = time.perf_counter() - t0
    return decision

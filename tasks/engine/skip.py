"""Which tiles have no signal: a tile whose whole input is empty is not run through the network.

Real scans are mostly empty: MRI background outside the head, satellite nodata outside the swath,
EM borders. A voxel is *empty* when every channel equals its channel's empty value -- the source's
declared nodata (GeoTIFF, per band; NaN matches NaN), a background value from the catalog
(``tiling.skip_empty``), or ``corner``: each channel's value at the scan's first voxel (the constant
background of skull-stripped, z-scored MRI differs per subject and per channel). Padding outside
the scan is empty too: a tile sees nothing else.

The decision costs almost nothing. It is made on the pyramid's lowest level first: a level-L voxel
is the mean of its block of level-0 voxels (means of means, level by level), so a block that is all
one value averages to that value up to rounding, and a level-L voxel that is *clearly* not that
value proves that its block holds a voxel that is not empty (``EmptyRule.proves_data``: finite, and
off by more than a bound on the rounding, worked out there). A tile whose box touches such a block
is run straight away (conservatively: the voxel may lie in the part of the block outside the
tile). Nothing else is decided on the pyramid: a coarse voxel near the empty value, or not finite
(float32 stores ingested before the pyramid summed in float64 hold -inf where the GDAL nodata
-3.4028235e38 was), only says "look at level 0". A tile is skipped only when all its level-0 voxels
are empty. A skipped tile's voxels that no run tile covers are background with probability 1 (the
engine's writer); elsewhere the run tiles alone are blended.
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

    def proves_data(self, coarse: np.ndarray, levels: int) -> np.ndarray:
        """(C, *spatial) of a pyramid level ``levels`` halvings below level 0 → (*spatial) bool: True
        where the voxel's block of level-0 voxels certainly holds a non-empty one. False means
        "unknown", never "empty": level 0 decides.

        A channel proves it when its coarse value is finite and differs from the empty value ``v``
        by more than ``margin``. Why that is sound: take a block whose level-0 voxels are all empty
        (all equal ``v``; for floats ``v`` rounded to the image's dtype, as ``empty`` compares in it)
        and follow it up the pyramid. Integers: every level is the rounded mean of values all equal
        to ``v``, exactly ``v`` (margin 0). Floats: each level sums at most 8 values of the level
        above (factors 1 or 2 per axis) one after another, divides by the count (a power of two,
        exact) and casts to the image's dtype. With ``u`` the unit roundoff of the image's dtype
        (the accumulator, float32 or float64 depending on the ingest version, is at least as
        precise), that is at most 9 roundings of relative size <= u per level (7 additions, a
        division exact but for underflow, a cast). The values summed all have the sign of ``v`` and
        lie within a relative e of it, so the sum's error is relative to the sum, and e grows to at
        most (1 + u)^n - 1 with n = 9 L after L levels; (1 + u)^n - 1 <= n u / (1 - n u) <= 2 n u
        while n u <= 1/2. Gradual underflow adds an absolute error under the dtype's smallest
        normal number per rounding. Hence ``margin = 2 n u |v| + n * smallest_normal``, which holds
        for the float32 sums of older ingests too (or they overflowed: see below).

        Not finite is "unknown" whatever it is: ±inf is an overflowed sum (old float32 stores at the
        dtype's extremes; float64 ones still), or an infinite ``v`` itself; NaN, when ``v`` is not NaN,
        means the block holds a NaN (which is data) or +inf and -inf, and is not worth reasoning
        about. When ``v`` is NaN a finite coarse value proves data: NaN propagates through every
        sum, so its block holds no NaN at all."""
        out = np.zeros(coarse.shape[1:], dtype=bool)
        for channel, value in zip(coarse, self.values):
            finite = np.isfinite(channel)
            if math.isnan(value):
                out |= finite
                continue
            if np.issubdtype(coarse.dtype, np.floating):
                with np.errstate(over="ignore"):
                    value = float(coarse.dtype.type(value))  # the empty voxels' value in the image's dtype
            margin = _rounding_margin(coarse.dtype, levels, value)
            with np.errstate(invalid="ignore"):
                out |= finite & (np.abs(channel.astype(np.float64) - value) > margin)
        return out


def _rounding_margin(dtype: np.dtype, levels: int, value: float) -> float:
    """How far a pyramid voxel ``levels`` halvings down may be from ``value`` (in ``dtype``) when its
    whole block is ``value`` (derived in ``EmptyRule.proves_data``); inf when the bound does not apply."""
    if not np.issubdtype(dtype, np.floating):
        return 0.0
    info = np.finfo(dtype)
    n = 9 * levels
    u = float(info.eps) / 2
    if not math.isfinite(value) or n * u > 0.5:
        return math.inf
    return 2 * n * u * abs(value) + n * float(info.smallest_normal)


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
    a coarse voxel that proves data (``EmptyRule.proves_data``) proves a non-empty voxel in its block,
    so the box reaches at least into the outermost such blocks, and no chunk lying inside the box of those blocks shrunk by
    one block per side can hold an extreme voxel. ``chunks``: level-0 spatial chunks; ``read`` reads
    (C, *box) of level 0."""
    coarse, factors, levels = _lowest_level(group)
    shape = tuple(group["image/0"].shape[1:])
    inner = None  # chunks wholly inside it need no read
    if coarse is not None:
        hits = np.nonzero(rule.proves_data(coarse, levels))
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


def _lowest_level(group) -> tuple[np.ndarray | None, tuple[int, ...], int]:
    """The smallest pyramid level of the scan's image: its voxels (C, *spatial) in memory (None
    without a pyramid), its factor per spatial axis from level 0 (OME-NGFF scales) and the number
    of halvings between them (each one rounds)."""
    datasets = group.attrs.get("ome", {}).get("multiscales", [{}])[0].get("datasets") or []
    if len(datasets) < 2:
        return None, (), 0
    first, last = datasets[0], datasets[-1]
    scale0 = first["coordinateTransformations"][0]["scale"][1:]
    scale = last["coordinateTransformations"][0]["scale"][1:]
    factors = tuple(int(round(s / s0)) for s, s0 in zip(scale, scale0))
    return np.asarray(group[last["path"]][...]), factors, len(datasets) - 1


def find_empty_tiles(group, plan: TilePlan, origins: Iterable[Origin], rule: EmptyRule,
                     read: Callable[[tuple[slice, ...]], np.ndarray]) -> SkipDecision:
    """The tiles among ``origins`` whose input is all empty under ``rule``. ``group`` is the scan group
    (its ``image`` pyramid); ``read(box)`` reads level 0 (C, *box), e.g. the engine's chunk cache."""
    t0 = time.perf_counter()
    coarse, factors, levels = _lowest_level(group)
    coarse_data = rule.proves_data(coarse, levels) if coarse is not None else None
    decision = SkipDecision()
    for origin in origins:
        lo = [max(o, 0) for o in origin]
        hi = [min(o + t, n) for o, t, n in zip(origin, plan.tile, plan.shape)]
        if coarse_data is not None:
            box = tuple(slice(a // f, -(-b // f)) for a, b, f in zip(lo, hi, factors))
            if coarse_data[box].any():
                continue  # a non-empty voxel in the block of a coarse voxel the tile touches
        decision.checked_at_level0 += 1
        block = read((slice(None),) + tuple(slice(a, b) for a, b in zip(lo, hi)))
        if rule.empty(block).all():
            decision.skipped.add(tuple(origin))
    decision.seconds = time.perf_counter() - t0
    return decision

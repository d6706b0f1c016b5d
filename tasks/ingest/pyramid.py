"""Multiscale pyramid planning and block-mean downsampling (pure functions, arrays in/out).

A level is computed from the level above by averaging 2-blocks along the axes that are
downsampled at that level. An axis is downsampled while its pixel size is within a factor two of
the finest spatial pixel size (so anisotropic EM stacks, 50 nm in Z vs 4 nm in Y/X, keep every Z
section, while isotropic MRI halves all three axes), as nnU-Net plans its pooling.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class PyramidPlan:
    shapes: list[tuple[int, ...]]  # spatial shape of every level, level 0 first
    factors: list[tuple[int, ...]]  # per level > 0: the factor (1 or 2) per spatial axis from the level above
    spacings: list[tuple[float, ...]]  # physical pixel size of every level, spatial axes

    @property
    def levels(self) -> int:
        return len(self.shapes)

    def slab_multiple(self, first: int = 0, last: int | None = None) -> int:
        """Slabs along the first spatial axis of level ``first`` must be a multiple of this so that
        levels ``first + 1 .. last`` each get whole pixels."""
        m = 1
        for f in self.factors[first:last]:
            m *= f[0]
        return m

    def single_pass_levels(self, chunk0: int) -> int:
        """The last level that slabs of one level-0 chunk row can feed (their first-axis halvings
        divide the chunk depth); the levels after it are built from that level in a second pass,
        so a one-section EM chunk never forces slabs of 2 ** levels sections."""
        last = 0
        while last + 1 < self.levels and chunk0 % self.slab_multiple(0, last + 1) == 0:
            last += 1
        return last

    def nested_order(self, chunks: tuple[int, ...], last: int | None = None) -> Callable[[int, int], tuple]:
        """A sort key for windows of level 0, by their start on the first two spatial axes, that
        finishes every chunk of levels 1 .. ``last`` before the next one of its level begins: the
        chunks of the coarsest level in row order, within each the chunks of the next finer level
        in row order, and so on down to the windows. Written in that order, a level holds one
        unfinished chunk at a time rather than a whole row of them (for windows that each lie in
        one chunk of a level or cover whole ones)."""
        last = self.levels - 1 if last is None else last
        spans = []  # per level 1 .. last: a chunk's extent in level-0 pixels on both axes
        scale = (1, 1)
        for f, shape in zip(self.factors[:last], self.shapes[1:last + 1]):
            scale = (scale[0] * f[0], scale[1] * f[1])
            spans.append(tuple(min(c, n) * s for c, n, s in zip(chunks[:2], shape[:2], scale)))
        spans.reverse()  # coarsest first

        def key(start: int, lo: int) -> tuple:
            return (*((start // a, lo // b) for a, b in spans), (start, lo))

        return key


def plan_pyramid(
    shape: tuple[int, ...],
    spacing: tuple[float, ...] | None,
    chunks: tuple[int, ...],
    max_levels: int = 6,
) -> PyramidPlan:
    """Levels until the downsampled axes fit in one chunk (at most ``max_levels``).

    ``shape``, ``spacing`` and ``chunks`` are spatial only, in array order (Z, Y, X) or (Y, X).
    """
    spacing = tuple(float(s) for s in spacing) if spacing else tuple(1.0 for _ in shape)
    shapes, factors, spacings = [tuple(shape)], [], [spacing]
    while len(shapes) < max_levels:
        cur, sp = shapes[-1], spacings[-1]
        finest = min(sp)
        f = tuple(2 if (sp[a] <= 2 * finest and cur[a] > 1) else 1 for a in range(len(cur)))
        # Stop once every axis we would halve already fits in one chunk.
        if all(cur[a] <= chunks[a] for a in range(len(cur)) if f[a] == 2) or all(x == 1 for x in f):
            break
        shapes.append(tuple(-(-n // k) for n, k in zip(cur, f)))
        factors.append(f)
        spacings.append(tuple(s * k for s, k in zip(sp, f)))
    return PyramidPlan(shapes=shapes, factors=factors, spacings=spacings)


# dtype -> sum dtype wide enough for 8 values (a 2x2x2 block). Floats narrower than 64 bits sum in
# float64: in their own width, 2x2 blocks of float32's nodata -3.4028235e38 overflow to -inf (and an
# empty-tile test reading the pyramid would take -inf for data); in float64 the sum of up to 8 of
# them is exact, so a block of one value averages to exactly that value, and the mean is rounded once.
_ACCUMULATOR = {
    np.dtype(np.uint8): np.uint16, np.dtype(np.int8): np.int16, np.dtype(np.uint16): np.uint32,
    np.dtype(np.int16): np.int32, np.dtype(np.uint32): np.int64, np.dtype(np.int32): np.int64,
    np.dtype(np.float16): np.float64, np.dtype(np.float32): np.float64, np.dtype(np.float64): np.float64,
}


HALVING_BLOCK_BYTES = 1 << 20  # input summed at a time by the float path of _halving_sum


def _block_counts(spatial: tuple[int, ...], factors: tuple[int, ...]) -> np.ndarray | int:
    """Pixels per output block (short trailing blocks have fewer); an int when all are full."""
    if all(n % f == 0 for n, f in zip(spatial, factors)):
        return int(np.prod(factors))
    counts = np.ones((), dtype=np.int64)
    for n, f in zip(spatial, factors):
        per_block = np.full(-(-n // f), f, dtype=np.int64)
        per_block[-1] = n - f * (len(per_block) - 1)
        counts = counts[..., None] * per_block
    return counts


def _halving_sum(block: np.ndarray, factors: tuple[int, ...], acc) -> np.ndarray:
    """Sum of each block for factors of 1 or 2: strided views added into a small accumulator,
    so no full-size temporary is made (this is the hot loop of ingest). Integers (exact in any
    order) are halved one axis at a time, slowest first: the first, largest add then runs over
    whole contiguous rows (uint8 EM sections 1.6x faster)."""
    if np.issubdtype(acc, np.integer):
        return _halving_sum_by_axis(block, factors, acc)
    lead = block.ndim - len(factors)
    out_shape = block.shape[:lead] + tuple(-(-n // f) for n, f in zip(block.shape[lead:], factors))
    total = np.zeros(out_shape, dtype=acc)
    # A few output rows (first halved axis) at a time: their ~1 MB of input stays in cache over the
    # 2**d strided adds (float32 means 2x faster than adding each offset over the whole window).
    # Every output value still sums its pixels in the same order: the same bytes.
    f0, rest = factors[0], (slice(None),) * (len(factors) - 1)
    row_bytes = block[(Ellipsis, slice(0, f0)) + rest].nbytes
    step = max(1, HALVING_BLOCK_BYTES // max(row_bytes, 1))
    for r in range(0, out_shape[lead], step):
        sub = block[(Ellipsis, slice(r * f0, (r + step) * f0)) + rest]
        part = total[(Ellipsis, slice(r, r + step)) + rest]
        for offsets in itertools.product(*(range(f) for f in factors)):
            view = sub[(Ellipsis,) + tuple(slice(o, None, f) for o, f in zip(offsets, factors))]
            target = part[(Ellipsis,) + tuple(slice(0, n) for n in view.shape[lead:])]
            np.add(target, view, out=target, casting="unsafe")
    return total


def _halving_sum_by_axis(block: np.ndarray, factors: tuple[int, ...], acc) -> np.ndarray:
    """:func:`_halving_sum` for integer accumulators: pairs along each halved axis added in turn
    (a short trailing block keeps its one value)."""
    lead = block.ndim - len(factors)
    total = block
    for axis, f in enumerate(factors, start=lead):
        if f == 1:
            continue
        n = total.shape[axis]
        pick = [slice(None)] * total.ndim
        pick[axis] = slice(0, None, 2)
        first = total[tuple(pick)]
        pick[axis] = slice(1, None, 2)
        second = total[tuple(pick)]
        if n % 2 == 0:
            total = np.add(first, second, dtype=acc)
            continue
        out = first.astype(acc)  # a short last block keeps its one value
        pick[axis] = slice(0, n // 2)
        target = out[tuple(pick)]
        np.add(target, second, out=target, casting="unsafe")
        total = out
    return total if total is not block else block.astype(acc)


def downsample_mean(block: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """Average non-overlapping blocks of ``factors`` over the trailing axes of ``block``.

    Leading axes (channels) are left alone. A short trailing block is averaged over the pixels it
    has. Integer inputs are rounded half up and returned in their own dtype, exactly, 64-bit ones
    included; bool gives the majority (ties True); NaN in float inputs propagates to its block.
    Floats are summed in float64 and rounded to their dtype once: a float16/float32 block of one
    value gives exactly that value, the dtype's extremes included (no overflow to infinity).
    """
    lead = block.ndim - len(factors)
    spatial = block.shape[lead:]
    counts = _block_counts(spatial, factors)
    if all(f in (1, 2) for f in factors) and (block.dtype in _ACCUMULATOR or block.dtype == np.bool_):
        acc = np.uint8 if block.dtype == np.bool_ else _ACCUMULATOR[block.dtype]
        total = _halving_sum(block, factors, acc)
        if block.dtype == np.bool_:
            return total.astype(np.int64) * 2 >= counts if not isinstance(counts, int) else total * 2 >= counts
        if np.issubdtype(block.dtype, np.floating):
            total /= np.asarray(counts, dtype=total.dtype)
            return total.astype(block.dtype, copy=False)
        half = np.asarray(counts, dtype=acc) // 2
        total += half
        if isinstance(counts, int) and counts & (counts - 1) == 0:  # 2, 4, 8 pixels: a shift floors as // does
            total >>= counts.bit_length() - 1
        else:
            total //= np.asarray(counts, dtype=acc)
        return total.astype(block.dtype)
    return _general_mean(block, factors, counts)


def _general_mean(block: np.ndarray, factors: tuple[int, ...], counts) -> np.ndarray:
    """Any factors, any dtype: zero-pad, reshape, reduce (64-bit integers without overflow)."""
    lead = block.ndim - len(factors)
    spatial = block.shape[lead:]
    pad = [(0, 0)] * lead + [(0, (-n) % f) for n, f in zip(spatial, factors)]
    if any(p[1] for p in pad):
        block = np.pad(block, pad, mode="constant")  # zeros add nothing to a sum
    shape = list(block.shape[:lead])
    axes = []
    for i, (n, f) in enumerate(zip(spatial, factors)):
        shape += [-(-n // f), f]
        axes.append(lead + 2 * i + 1)
    axes = tuple(axes)
    counts = np.asarray(counts, dtype=np.int64)
    view = block.reshape(shape)
    if np.issubdtype(block.dtype, np.floating):
        acc = np.float64  # as in _ACCUMULATOR: no overflow for float16/float32, one rounding
        return (view.sum(axis=axes, dtype=acc) / counts.astype(acc)).astype(block.dtype, copy=False)
    if block.dtype == np.bool_:
        return view.sum(axis=axes, dtype=np.int64) * 2 >= counts
    if block.dtype.itemsize < 8:
        total = view.sum(axis=axes, dtype=np.int64)  # a block of < 2**31 values of 32 bits fits
        return ((total + counts // 2) // counts).astype(block.dtype)
    # 64-bit integers: per pixel x = c * q + r with 0 <= r < c (c: its block's pixel count), so the
    # block mean is sum(q) + sum(r) / c; sum(q) stays inside the dtype and sum(r) is small.
    per_pixel = counts
    if per_pixel.ndim:  # short trailing blocks: each pixel divides by its own block's count
        for axis in range(len(factors)):
            per_pixel = np.expand_dims(per_pixel, axis=2 * axis + 1)
    quotient, remainder = np.divmod(view, per_pixel.astype(block.dtype))
    rounded = (remainder.sum(axis=axes, dtype=np.int64) + counts // 2) // counts
    return quotient.sum(axis=axes, dtype=block.dtype) + rounded.astype(block.dtype)

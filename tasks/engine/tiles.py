"""Reading tiles (C, *tile) out of a channel-first Zarr image, padding where a tile leaves the scan."""

from __future__ import annotations

import itertools
import math
from typing import Callable, Literal

import numpy as np
import zarr

from tasks.chunk_io import ChunkCodec
from tasks.engine.plan import TilePlan, band_bytes

PadMode = Literal["reflect", "constant"]


def reflect_indices(start: int, stop: int, size: int) -> np.ndarray:
    """Source indices of positions [start, stop) mirrored at the borders without repeating the edge
    voxel (numpy's and torch's ``reflect``), e.g. size 4: ... 2 1 | 0 1 2 3 | 2 1 ..."""
    idx = np.arange(start, stop)
    if size == 1:
        return np.zeros_like(idx)
    period = 2 * (size - 1)
    idx = np.mod(idx, period)
    return np.where(idx >= size, period - idx, idx)


def source_box(origin: tuple[int, ...], tile: tuple[int, ...], shape: tuple[int, ...], mode: PadMode = "reflect"
               ) -> tuple[slice, ...]:
    """The spatial box of the scan that ``read_tile`` reads for the tile at ``origin``."""
    if all(o >= 0 and o + t <= n for o, t, n in zip(origin, tile, shape)):
        return tuple(slice(o, o + t) for o, t in zip(origin, tile))
    if mode == "constant":
        return tuple(slice(max(o, 0), min(o + t, n)) for o, t, n in zip(origin, tile, shape))
    indices = [reflect_indices(o, o + t, n) for o, t, n in zip(origin, tile, shape)]
    return tuple(slice(int(i.min()), int(i.max()) + 1) for i in indices)


def source_reads(plan: TilePlan, chunks: tuple[int, ...], mode: PadMode = "reflect"
                 ) -> tuple[Callable[[tuple[int, ...]], int], int]:
    """How many of ``plan``'s tiles read each chunk (channel index first, then the spatial chunk
    ``chunks`` grid) of the image, and how many chunks are read at all. A tile's source box is a
    product of per-axis ranges (:func:`source_box` works axis by axis), so both are products of
    per-axis counts."""
    per_axis = []
    for axis, (n, t, c) in enumerate(zip(plan.shape, plan.tile, chunks)):
        counts = [0] * -(-n // c)
        for s in plan.starts[axis]:
            box = source_box((s - plan.pad_before[axis],), (t,), (n,), mode)[0]
            for ci in range(box.start // c, (box.stop - 1) // c + 1):
                counts[ci] += 1
        per_axis.append(counts)
    needed = math.prod(sum(1 for k in counts if k) for counts in per_axis)
    return (lambda index: math.prod(counts[i] for counts, i in zip(per_axis, index[1:]))), needed


def source_band(plan: TilePlan, chunks: tuple[int, ...], voxel_bytes: int, mode: PadMode = "reflect") -> int:
    """The input chunks (spatial ``chunks``, ``voxel_bytes`` a voxel over all channels) a raster-order
    run of ``plan`` keeps decoded for the tiles that still read them, in bytes per voxel of the last
    axis: the chunk rows open at once (``plan.band_bytes`` of the tile rows' source boxes) across the width."""
    n, t, p = plan.shape[0], plan.tile[0], plan.pad_before[0]
    boxes = ((box.start, box.stop) for box in (source_box((s - p,), (t,), (n,), mode)[0] for s in plan.starts[0]))
    return band_bytes(plan.shape, boxes, chunks, voxel_bytes)


def read_tile(array, origin: tuple[int, ...], tile: tuple[int, ...], mode: PadMode = "reflect",
              out: np.ndarray | None = None) -> np.ndarray:
    """The tile at ``origin`` (scan coordinates, may be negative) of ``array`` (C, *spatial), as float32;
    into ``out`` (float32, (C, *tile)) when given: a tile inside the scan read from a
    :class:`ChunkCache` goes from its chunks straight into it, cast on the way (no tile-sized copies)."""
    shape = array.shape[1:]
    inside = all(o >= 0 and o + t <= n for o, t, n in zip(origin, tile, shape))
    if inside:
        box = (slice(None),) + tuple(slice(o, o + t) for o, t in zip(origin, tile))
        if out is not None and isinstance(array, ChunkCache):
            return array.read(box, out)
        if out is not None:
            out[...] = array[box]
            return out
        return np.asarray(array[box], dtype=np.float32)
    if out is not None:
        out[...] = read_tile(array, origin, tile, mode)
        return out
    if mode == "constant":
        lo = [max(o, 0) for o in origin]
        hi = [min(o + t, n) for o, t, n in zip(origin, tile, shape)]
        block = np.asarray(array[(slice(None),) + tuple(slice(a, b) for a, b in zip(lo, hi))], dtype=np.float32)
        pad = [(0, 0)] + [(a - o, (o + t) - b) for a, b, o, t in zip(lo, hi, origin, tile)]
        return np.pad(block, pad, mode="constant")
    indices = [reflect_indices(o, o + t, n) for o, t, n in zip(origin, tile, shape)]
    box = (slice(None),) + source_box(origin, tile, shape, mode)
    block = np.asarray(array[box], dtype=np.float32)
    for axis, idx in enumerate(indices, start=1):
        block = np.take(block, idx - idx.min(), axis=axis)
    return block


class ChunkCache:
    """Decoded input chunks kept for reuse, least recently used first out, within ``budget_bytes``.

    With 50 % overlap a 3D tile shares each input voxel with up to 7 neighbours; reading tiles
    straight from Zarr would decompress the scan ~8 times. Tiles come in raster order, so the
    chunks around the moving window are all a cache needs to hold. Same indexing as the array
    (``cache[box]``, channel axis first), so ``read_tile`` takes either.

    ``expect(box)`` announces a read to come: a chunk whose announced reads have all happened is
    dropped at once, so the cache holds the window's chunks, not ``budget_bytes`` of chunks the
    window has left behind (the budget still caps it). ``expect_grid(uses)`` announces them all at
    once by a function (a chunk's count is taken at its first read): no table of every chunk.

    ``reads`` counts chunks decoded; ``needed`` the distinct chunks announced: ``reads / needed``
    is 1 when every chunk is decoded once.
    """

    def __init__(self, array, budget_bytes: int = 256 << 20):
        from collections import OrderedDict

        self.array = array
        # a local Zarr array's chunks decoded in this thread, not through zarr's event loop (tasks.chunk_io)
        self._codec = ChunkCodec.for_array(array) if isinstance(array, zarr.Array) else None
        self.shape = array.shape
        self.chunks = array.chunks
        self.budget = budget_bytes
        self._cache: OrderedDict = OrderedDict()
        self._bytes = 0
        self._uses: dict[tuple[int, ...], int] = {}  # chunk -> announced reads still to come
        self._grid_uses: Callable[[tuple[int, ...]], int] | None = None
        self.reads = 0
        self.needed = 0

    def _chunks_of(self, box: tuple[slice, ...]):
        box = tuple(box) + (slice(None),) * (len(self.shape) - len(box))
        bounds = [s.indices(n)[:2] for s, n in zip(box, self.shape)]
        ranges = [range(a // c, (b - 1) // c + 1) if b > a else range(0) for (a, b), c in zip(bounds, self.chunks)]
        return bounds, itertools.product(*ranges)

    def expect(self, box: tuple[slice, ...]) -> None:
        for index in self._chunks_of(box)[1]:
            left = self._uses.get(index, 0)
            self.needed += left == 0
            self._uses[index] = left + 1

    def expect_grid(self, uses: Callable[[tuple[int, ...]], int], needed: int) -> None:
        """Every read to come, as ``uses(chunk index)``; ``needed``: how many chunks have uses > 0."""
        self._grid_uses = uses
        self.needed = needed

    def clear(self) -> None:
        """Drop every decoded chunk and every announced read."""
        self._cache.clear()
        self._bytes = 0
        self._uses.clear()

    def _chunk(self, index: tuple[int, ...]) -> np.ndarray:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        box = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, self.chunks, self.shape))
        data = self._codec.read(index) if self._codec is not None else np.asarray(self.array[box])
        self.reads += 1
        if self._grid_uses is not None and index not in self._uses:
            self._uses[index] = self._grid_uses(index)
        self._cache[index] = data
        self._bytes += data.nbytes
        while self._bytes > self.budget and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._bytes -= old.nbytes
        return data

    def __getitem__(self, box: tuple[slice, ...]) -> np.ndarray:
        return self.read(box)

    def read(self, box: tuple[slice, ...], out: np.ndarray | None = None) -> np.ndarray:
        """``self[box]``, into ``out`` when given (of the box's shape, any dtype: cast as copied)."""
        bounds, indices = self._chunks_of(box)
        if out is None:
            out = np.empty([b - a for a, b in bounds], dtype=self.array.dtype)
        for index in indices:
            data = self._chunk(index)
            src, dst = [], []
            for (a, b), i, c in zip(bounds, index, self.chunks):
                lo, hi = max(a, i * c), min(b, (i + 1) * c)
                src.append(slice(lo - i * c, hi - i * c))
                dst.append(slice(lo - a, hi - a))
            out[tuple(dst)] = data[tuple(src)]
            left = self._uses.get(index)
            if left is not None:
                if left > 1:
                    self._uses[index] = left - 1
                else:  # its last announced read: the window has moved past it
                    del self._uses[index]
                    dropped = self._cache.pop(index, None)
                    if dropped is not None:
                        self._bytes -= dropped.nbytes
        return out

"""Reading tiles (C, *tile) out of a channel-first Zarr image, padding where a tile leaves the scan."""

from __future__ import annotations

from typing import Literal

import numpy as np

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


def read_tile(array, origin: tuple[int, ...], tile: tuple[int, ...], mode: PadMode = "reflect") -> np.ndarray:
    """The tile at ``origin`` (scan coordinates, may be negative) of ``array`` (C, *spatial), as float32."""
    shape = array.shape[1:]
    inside = all(o >= 0 and o + t <= n for o, t, n in zip(origin, tile, shape))
    if inside:
        box = (slice(None),) + tuple(slice(o, o + t) for o, t in zip(origin, tile))
        return np.asarray(array[box], dtype=np.float32)
    if mode == "constant":
        lo = [max(o, 0) for o in origin]
        hi = [min(o + t, n) for o, t, n in zip(origin, tile, shape)]
        block = np.asarray(array[(slice(None),) + tuple(slice(a, b) for a, b in zip(lo, hi))], dtype=np.float32)
        pad = [(0, 0)] + [(a - o, (o + t) - b) for a, b, o, t in zip(lo, hi, origin, tile)]
        return np.pad(block, pad, mode="constant")
    indices = [reflect_indices(o, o + t, n) for o, t, n in zip(origin, tile, shape)]
    box = (slice(None),) + tuple(slice(int(i.min()), int(i.max()) + 1) for i in indices)
    block = np.asarray(array[box], dtype=np.float32)
    for axis, idx in enumerate(indices, start=1):
        block = np.take(block, idx - idx.min(), axis=axis)
    return block

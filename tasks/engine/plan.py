"""Where the tiles go: tile positions, border padding, and which tiles touch which output chunk.

Pure functions on integers; no arrays are read here. Coordinates are spatial, in array order
(Z, Y, X) or (Y, X), in voxels of level 0.

Two placements of tile starts along an axis are offered:

- ``even`` (default), nnU-Net's: the fewest tiles whose step is at most ``tile * (1 - overlap)``,
  spread evenly so the first tile starts at 0 and the last ends flush with the border
  (Isensee et al., nnU-Net, Nature Methods 2021; ``compute_steps_for_sliding_window``).
- ``monai``: MONAI ``sliding_window_inference``'s, a fixed step ``int(tile * (1 - overlap))`` with the
  last tile pulled back to end flush (``monai.data.utils.dense_patch_slices``). Offered so results
  can be compared with MONAI voxel for voxel.

An axis shorter than the tile is padded up to the tile (MONAI's rule: ``diff // 2`` before, the
rest after); the padded voxels come from mirroring (``reflect``) or zeros (``constant``). Only
voxels inside the scan are ever written.

``region`` (optional, per axis [lo, hi)): the tiles cover only that box of the scan -- the bounding
box of its non-empty voxels (``tasks.engine.skip``) -- placed over it as over a scan of that size;
a box thinner than the tile gets one tile centred on it, kept inside the scan.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Iterable, Iterator, Literal

import numpy as np

Placement = Literal["even", "monai"]


def even_starts(size: int, tile: int, overlap: float) -> list[int]:
    """nnU-Net's evenly spaced starts for an axis of ``size`` >= ``tile``."""
    if size <= tile:
        return [0]
    target_step = tile * (1.0 - overlap)
    count = int(math.ceil((size - tile) / target_step)) + 1
    step = (size - tile) / (count - 1)
    return sorted({int(round(step * i)) for i in range(count)})  # rounding can repeat a start


def monai_starts(size: int, tile: int, overlap: float) -> list[int]:
    """MONAI ``dense_patch_slices`` starts for an axis of ``size`` >= ``tile``."""
    if size == tile:
        return [0]
    interval = max(int(tile * (1.0 - overlap)), 1)
    count = next(d for d in range(int(math.ceil(size / interval))) if d * interval + tile >= size) + 1
    return [i * interval - max(i * interval + tile - size, 0) for i in range(count)]


@dataclass(frozen=True)
class TilePlan:
    """Tile starts per axis in *padded* coordinates; ``pad_before[a]`` voxels precede the scan."""

    shape: tuple[int, ...]  # scan's spatial shape
    tile: tuple[int, ...]
    starts: tuple[tuple[int, ...], ...]  # per axis, padded coordinates
    pad_before: tuple[int, ...]
    chunks: tuple[int, ...]  # output chunk shape (spatial)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def chunk_grid(self) -> tuple[int, ...]:
        return tuple(-(-n // c) for n, c in zip(self.shape, self.chunks))

    def tile_count(self) -> int:
        return math.prod(len(s) for s in self.starts)

    def tiles(self) -> Iterator[tuple[int, ...]]:
        """Tile origins in scan coordinates (may be negative where padded), raster order
        (first axis slowest), as MONAI enumerates them."""
        for start in itertools.product(*self.starts):
            yield tuple(s - p for s, p in zip(start, self.pad_before))

    def chunk_box(self, index: tuple[int, ...]) -> tuple[slice, ...]:
        return tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, self.chunks, self.shape))

    def chunks_of_tile(self, origin: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
        """Output chunks that the tile at ``origin`` overlaps inside the scan."""
        ranges = []
        for o, t, c, n in zip(origin, self.tile, self.chunks, self.shape):
            lo, hi = max(o, 0), min(o + t, n)
            if hi <= lo:
                return
            ranges.append(range(lo // c, (hi - 1) // c + 1))
        yield from itertools.product(*ranges)

    def tiles_of_chunk(self, index: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
        """Origins (scan coordinates) of the tiles that overlap chunk ``index``, in raster order."""
        per_axis = []
        for axis, b in enumerate(self.chunk_box(index)):
            origins = (s - self.pad_before[axis] for s in self.starts[axis])
            per_axis.append([o for o in origins if o < b.stop and o + self.tile[axis] > b.start])
        yield from itertools.product(*per_axis)

    def overlap(self, origin: tuple[int, ...], index: tuple[int, ...]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
        """Where the tile at ``origin`` and chunk ``index`` meet: (slices in the chunk, slices in the tile)."""
        box = self.chunk_box(index)
        inter = [(max(b.start, o), min(b.stop, o + t)) for b, o, t in zip(box, origin, self.tile)]
        return (tuple(slice(lo - b.start, hi - b.start) for (lo, hi), b in zip(inter, box)),
                tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(inter, origin)))

    @cached_property
    def _tiles_per_chunk_axes(self) -> tuple[tuple[int, ...], ...]:
        """Per axis, per chunk along it: how many tile starts overlap it inside the scan."""
        per_axis = []
        for axis in range(self.ndim):
            counts = [0] * self.chunk_grid[axis]
            for s in self.starts[axis]:
                o = s - self.pad_before[axis]
                lo, hi = max(o, 0), min(o + self.tile[axis], self.shape[axis])
                for ci in range(lo // self.chunks[axis], (hi - 1) // self.chunks[axis] + 1):
                    counts[ci] += 1
            per_axis.append(tuple(counts))
        return tuple(per_axis)

    def tiles_in_chunk(self, index: tuple[int, ...]) -> int:
        """How many tiles overlap chunk ``index``: the count at which it is final. The tiles are a
        product of per-axis starts, so this is a product of per-axis counts (no table per chunk)."""
        return math.prod(axis[i] for axis, i in zip(self._tiles_per_chunk_axes, index))

    def stripes(self, width: int) -> list[tuple["TilePlan", "ChunkColumns"]]:
        """The plan cut along its last axis into stripes of ``width`` voxels (whole chunks): per stripe,
        a plan of the tiles that overlap its chunks (every tile over a chunk of the stripe, so a
        chunk's count is the same; a tile over two stripes is in both) and the stripe's chunks."""
        c, n = self.chunks[-1], self.shape[-1]
        if width % c:
            raise ValueError(f"stripe width {width} is not a multiple of the chunk {c}")
        out = []
        for lo in range(0, n, width):
            hi = min(lo + width, n)
            starts = tuple(s for s in self.starts[-1]
                           if max(s - self.pad_before[-1], 0) < hi and s - self.pad_before[-1] + self.tile[-1] > lo)
            out.append((replace(self, starts=self.starts[:-1] + (starts,)),
                        ChunkColumns(lo // c, -(-hi // c))))
        return out

    def tiles_per_chunk(self) -> dict[tuple[int, ...], int]:
        """:meth:`tiles_in_chunk` of every chunk, as a table."""
        return {idx: self.tiles_in_chunk(idx) for idx in itertools.product(*(range(g) for g in self.chunk_grid))}


@dataclass(frozen=True)
class ChunkColumns:
    """The chunks whose last index is in [lo, hi): one stripe of :meth:`TilePlan.stripes`. Asked
    only of chunks of the plan's grid (``chunks_of_tile``), so the last index is all it checks."""

    lo: int
    hi: int

    def __contains__(self, index) -> bool:
        return self.lo <= index[-1] < self.hi


def open_rows(boxes: Iterable[tuple[int, int]], chunk: int) -> int:
    """The most chunk rows (along the first axis, ``chunk`` voxels each) a raster-order run keeps
    open at once, ``boxes`` being each tile row's [lo, hi) along that axis, in order. A chunk row is
    open from the first tile row over it to the last; while tile row i crosses the scan, the rows
    still wanted by row i + 1 are open to its left and those row i still wants to its right, so the
    most open at once is the most rows that both of two consecutive tile rows cover (at least one)."""
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    count = 0
    for i, (lo, hi) in enumerate(boxes):
        count = i + 1
        for r in range(lo // chunk, (hi - 1) // chunk + 1):
            first.setdefault(r, i)
            last[r] = i
    spans = [0] * count
    for r, i in first.items():
        for k in range(i, last[r]):
            spans[k] += 1
    return max(spans + [1])


def band_bytes(shape: tuple[int, ...], boxes: Iterable[tuple[int, int]], chunks: tuple[int, ...],
               voxel_bytes: int) -> int:
    """What a raster-order run keeps open per voxel of the last axis, in bytes: the chunk rows open
    at once (:func:`open_rows` of the tile rows' ``boxes``) across the middle axes, whole chunks."""
    middle = math.prod(-(-n // c) * c for n, c in zip(shape[1:-1], chunks[1:-1]))
    return open_rows(boxes, chunks[0]) * chunks[0] * middle * voxel_bytes


def stripe_width(plan: TilePlan, classes: int, budget_bytes: int, source_bytes: int = 0,
                 min_tiles: int = 32) -> int | None:
    """The width (whole chunks along the last axis) of the stripes to run ``plan`` in, so that what
    a row of tiles keeps open across the width stays within ``budget_bytes``: ``classes`` float32
    sums over the output chunk rows open at once (:func:`open_rows`), plus ``source_bytes`` per voxel
    of width for the input chunks kept decoded (``tiles.source_band``); None when the whole width
    fits. A stripe is at least ``min_tiles`` tiles wide: the tiles over a stripe's border run in
    both stripes (about tile / width more tiles), and its input chunks are decoded twice."""
    p, t, n = plan.pad_before[0], plan.tile[0], plan.shape[0]
    boxes = ((max(s - p, 0), min(s - p + t, n)) for s in plan.starts[0])
    per_voxel = band_bytes(plan.shape, boxes, plan.chunks, classes * 4) + source_bytes  # bytes per voxel of width
    if per_voxel * plan.shape[-1] <= budget_bytes:
        return None
    c = plan.chunks[-1]
    width = max(budget_bytes // per_voxel, min_tiles * plan.tile[-1], c) // c * c
    return width if width < plan.shape[-1] else None


class ChunkSet:
    """The chunks of a grid whose flag is down (e.g. not done yet), read from a boolean array of the
    grid: one byte per chunk instead of a set of tuples (65,536 chunks: 64 KB, not 6 MB)."""

    def __init__(self, flags: np.ndarray, want: bool = False):
        self._member = np.asarray(flags, dtype=bool) == want

    def __contains__(self, index) -> bool:
        try:
            return bool(self._member[tuple(index)])
        except IndexError:
            return False

    def __len__(self) -> int:
        return int(self._member.sum())

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        for index in zip(*np.nonzero(self._member)):
            yield tuple(int(i) for i in index)

    def is_all(self) -> bool:
        return bool(self._member.all())


def plan_tiles(shape: tuple[int, ...], tile: tuple[int, ...], overlap: float, chunks: tuple[int, ...],
               placement: Placement = "even", region: tuple[tuple[int, int], ...] | None = None) -> TilePlan:
    """Plan the tiles over a scan of spatial ``shape`` (validated by the caller), or over ``region``."""
    if len(tile) != len(shape) or len(chunks) != len(shape):
        raise ValueError(f"tile {tile} and chunks {chunks} must have one size per spatial axis of {shape}")
    starts_fn = even_starts if placement == "even" else monai_starts
    pad_before, starts = [], []
    for axis, (n, t) in enumerate(zip(shape, tile)):
        diff = max(t - n, 0)
        pad_before.append(diff // 2)
        lo, hi = region[axis] if region is not None else (0, n)
        if diff or (lo, hi) == (0, n):
            starts.append(tuple(starts_fn(max(n, t), t, overlap)))
        elif hi - lo >= t:
            starts.append(tuple(lo + s for s in starts_fn(hi - lo, t, overlap)))
        else:  # one tile centred on a box thinner than the tile, inside the scan
            starts.append((min(max(lo - (t - (hi - lo)) // 2, 0), n - t),))
    return TilePlan(tuple(shape), tuple(tile), tuple(starts), tuple(pad_before), tuple(chunks))


def split_regions(grid: tuple[int, ...], region_chunks: tuple[int, ...]) -> list[list[tuple[int, ...]]]:
    """Cut a chunk grid into blocks of ``region_chunks`` chunks; each block is one Dask job."""
    blocks = []
    for corner in itertools.product(*(range(0, g, r) for g, r in zip(grid, region_chunks))):
        blocks.append(list(itertools.product(*(range(c, min(c + r, g))
                                                for c, r, g in zip(corner, region_chunks, grid)))))
    return blocks

"""Per-chunk accumulation of weighted logits, finalised chunk by chunk, within a memory budget.

Each output chunk owns a float32 sum of weighted logits (K, *chunk); the matching sum of weights
depends on the tile plan only and is computed when the chunk is written (``blend.chunk_weights``),
so it is never held for the live chunks. A tile adds into every chunk it overlaps; a chunk whose
last overlapping tile has been added is final and is handed back to the caller. With tiles in
raster order only the chunks around the moving window are live (a wide scan runs in stripes,
``TilePlan.stripes``, each adding only into its own chunks); if they still exceed
``budget_bytes``, the least recently touched ones are spilled to a scratch folder and read back
when a tile needs them, so memory stays bounded whatever the scan size.

Buffers are recycled (``BufferPool``): the caller gives a finished chunk's array back once it is
written, and the next chunk reuses it, so the steady state allocates nothing and freed blocks do
not pile up in the allocator's heap.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Container, Iterator

import numpy as np

from tasks.engine.plan import TilePlan

Chunk = tuple[int, ...]


class BufferPool:
    """Zeroed float32 arrays by shape, given back after use and handed out again (thread-safe)."""

    def __init__(self, keep: int = 64):
        self._free: dict[tuple[int, ...], list[np.ndarray]] = {}
        self._lock = threading.Lock()
        self.keep = keep  # spare arrays kept per shape at most

    def take(self, shape: tuple[int, ...]) -> np.ndarray:
        with self._lock:
            spare = self._free.get(tuple(shape))
            array = spare.pop() if spare else None
        if array is None:
            return np.zeros(shape, np.float32)
        array.fill(0)
        return array

    def give(self, array: np.ndarray) -> None:
        with self._lock:
            spare = self._free.setdefault(array.shape, [])
            if len(spare) < self.keep:
                spare.append(array)


class ChunkAccumulator:
    """``wanted``: the chunks to produce (any container); ``count(chunk)``: how many tiles it takes
    (the tiles that will be added over it). A chunk's count is taken when its first tile comes, so
    only begun chunks are in ``remaining``, never a table of the whole grid."""

    def __init__(self, plan: TilePlan, classes: int, wanted: Container[Chunk], count: Callable[[Chunk], int],
                 budget_bytes: int, pool: BufferPool | None = None):
        self.plan = plan
        self.classes = classes
        self.wanted = wanted
        self.count = count
        self.remaining: dict[Chunk, int] = {}  # begun chunk -> tiles still to add
        self.completed = 0
        self.budget = budget_bytes
        self.pool = pool or BufferPool()
        self._live: OrderedDict[Chunk, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._scratch: Path | None = None
        self._spilled: set[Chunk] = set()
        self.spills = 0
        self.peak_bytes = 0

    def _chunk_shape(self, index: Chunk) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.plan.chunk_box(index))

    def _get(self, index: Chunk) -> np.ndarray:
        if index in self._live:
            self._live.move_to_end(index)
            return self._live[index]
        logits = self.pool.take((self.classes, *self._chunk_shape(index)))
        if index in self._spilled:
            path = self._scratch / ("_".join(map(str, index)) + ".npy")
            logits[...] = np.load(path)
            path.unlink()
            self._spilled.discard(index)
        self._live[index] = logits
        self._bytes += logits.nbytes
        self.peak_bytes = max(self.peak_bytes, self._bytes)
        return logits

    def _evict(self, keep: set[Chunk]) -> None:
        while self._bytes > self.budget and len(self._live) > len(keep):
            index = next(i for i in self._live if i not in keep)
            logits = self._live.pop(index)
            if self._scratch is None:
                self._scratch = Path(tempfile.mkdtemp(prefix="tilewise-spill-"))
            np.save(self._scratch / ("_".join(map(str, index)) + ".npy"), logits)
            self.pool.give(logits)
            self._spilled.add(index)
            self._bytes -= logits.nbytes
            self.spills += 1

    def add(self, origin: tuple[int, ...], weighted_logits: np.ndarray, wanted: Container[Chunk] | None = None
            ) -> Iterator[tuple[Chunk, np.ndarray]]:
        """Add one tile's (K, *tile) weighted logits; yield the chunks it completes as (index, summed
        logits). Give each yielded array back to ``pool`` once it is written. ``wanted``: the chunks
        this tile adds into (a stripe's), else the run's."""
        wanted = self.wanted if wanted is None else wanted
        touched = [c for c in self.plan.chunks_of_tile(origin) if c in self.remaining or c in wanted]
        for index in touched:
            if index not in self.remaining:  # its first tile (a finished chunk gets no more tiles)
                self.remaining[index] = self.count(index)
            logits = self._get(index)
            chunk_sl, tile_sl = self.plan.overlap(origin, index)
            logits[(slice(None),) + chunk_sl] += weighted_logits[(slice(None),) + tile_sl]
            self.remaining[index] -= 1
        done = [c for c in touched if self.remaining[c] == 0]
        for index in done:
            logits = self._live.pop(index)
            self._bytes -= logits.nbytes
            del self.remaining[index]
            self.completed += 1
            yield index, logits
        self._evict(keep=set(touched))

    def close(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)

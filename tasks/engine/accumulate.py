"""Per-chunk accumulation of weighted logits, finalised chunk by chunk, within a memory budget.

Each output chunk owns a float32 sum of weighted logits (K, *chunk) and a sum of weights (*chunk).
A tile adds into every chunk it overlaps; a chunk whose last overlapping tile has been added is
final and is handed back to the caller (and freed). With tiles in raster order only the chunks
around the moving window are live; if they still exceed ``budget_bytes`` (very wide scans), the
least recently touched ones are spilled to a scratch folder and read back when a tile needs them,
so memory stays bounded whatever the scan size.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import numpy as np

from tasks.engine.plan import TilePlan

Chunk = tuple[int, ...]


class ChunkAccumulator:
    def __init__(self, plan: TilePlan, classes: int, remaining: dict[Chunk, int], budget_bytes: int):
        self.plan = plan
        self.classes = classes
        self.remaining = dict(remaining)  # chunk -> tiles still to add; only chunks we must produce
        self.budget = budget_bytes
        self._live: OrderedDict[Chunk, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._bytes = 0
        self._scratch: Path | None = None
        self._spilled: set[Chunk] = set()
        self.spills = 0
        self.peak_bytes = 0

    def _chunk_shape(self, index: Chunk) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.plan.chunk_box(index))

    def _get(self, index: Chunk) -> tuple[np.ndarray, np.ndarray]:
        if index in self._live:
            self._live.move_to_end(index)
            return self._live[index]
        if index in self._spilled:
            path = self._scratch / ("_".join(map(str, index)) + ".npz")
            with np.load(path) as f:
                pair = (f["logits"], f["weights"])
            path.unlink()
            self._spilled.discard(index)
        else:
            shape = self._chunk_shape(index)
            pair = (np.zeros((self.classes, *shape), np.float32), np.zeros(shape, np.float32))
        self._live[index] = pair
        self._bytes += pair[0].nbytes + pair[1].nbytes
        self.peak_bytes = max(self.peak_bytes, self._bytes)
        return pair

    def _evict(self, keep: set[Chunk]) -> None:
        while self._bytes > self.budget and len(self._live) > len(keep):
            index = next(i for i in self._live if i not in keep)
            logits, weights = self._live.pop(index)
            if self._scratch is None:
                self._scratch = Path(tempfile.mkdtemp(prefix="tilewise-spill-"))
            np.savez(self._scratch / ("_".join(map(str, index)) + ".npz"), logits=logits, weights=weights)
            self._spilled.add(index)
            self._bytes -= logits.nbytes + weights.nbytes
            self.spills += 1

    def add(self, origin: tuple[int, ...], weighted_logits: np.ndarray, weights: np.ndarray
            ) -> Iterator[tuple[Chunk, np.ndarray, np.ndarray]]:
        """Add one tile (K, *tile) weighted logits and its (*tile) weights; yield the chunks it
        completes as (index, summed logits, summed weights)."""
        touched = [c for c in self.plan.chunks_of_tile(origin) if c in self.remaining]
        for index in touched:
            logits, wsum = self._get(index)
            box = self.plan.chunk_box(index)
            inter = [(max(b.start, o), min(b.stop, o + t)) for b, o, t in zip(box, origin, self.plan.tile)]
            chunk_sl = tuple(slice(lo - b.start, hi - b.start) for (lo, hi), b in zip(inter, box))
            tile_sl = tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(inter, origin))
            logits[(slice(None),) + chunk_sl] += weighted_logits[(slice(None),) + tile_sl]
            wsum[chunk_sl] += weights[tile_sl]
            self.remaining[index] -= 1
        done = [c for c in touched if self.remaining[c] == 0]
        for index in done:
            logits, wsum = self._live.pop(index)
            self._bytes -= logits.nbytes + wsum.nbytes
            del self.remaining[index]
            yield index, logits, wsum
        self._evict(keep=set(touched))

    def close(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)

"""The prediction's NGFF label pyramid (``labels/prediction``), written as label chunks finish.

Each finished output chunk's labels are encoded once, for ``prediction/labels``; the label image's
level 0 gets the same encoded bytes (same shape, chunks and codec: no second encode; on object
storage the buffer is encoded again rather than read back, a GET per chunk saved), and the
chunk's block mode goes into the level-1 chunk it belongs to, which is written (and pushed on to
level 2) when its last part is in. The values are those of ``write_label_levels`` (each level the
block mode of the one above), computed once from the finished buffer instead of re-reading level 0
after the run. Only the chunks whose parts are not all in yet are held: one row of level-1 chunks
and less below it.

It applies when no block of a level straddles two chunks of the level above (each chunk size a
multiple of the factor, or one chunk along that axis) and when one process writes every chunk of
the prediction; otherwise (a resumed run, a Dask region) the caller writes the pyramid after the
run from ``prediction/labels``.
"""

from __future__ import annotations

import itertools
import threading

import numpy as np
import zarr

from tasks import storage
from tasks.chunk_io import ChunkCodec
from tasks.export.ngff import COMPRESSOR, spatial_levels, downsample_mode

Box = tuple[slice, ...]
NOT_GIVEN = object()  # LabelPyramid.add: the caller did not say which bytes it stored


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _axis_counts(n_prev: int, c_prev: int, f: int, n_next: int, c_next: int) -> list[int]:
    """Per chunk of the next level along one axis: how many chunks of the level above feed it."""
    counts = [0] * _ceil_div(n_next, c_next)
    for start in range(0, n_prev, c_prev):
        lo, hi = start // f, _ceil_div(min(start + c_prev, n_prev), f)
        for j in range(lo // c_next, (hi - 1) // c_next + 1):
            counts[j] += 1
    return counts


class LabelPyramid:
    """Levels 0.. of ``target`` (a new, unlisted label image group), fed chunk by chunk by ``add``
    from any thread. ``complete`` says whether every chunk of every level has been written."""

    def __init__(self, scan: zarr.Group, target: zarr.Group, level0: zarr.Array, classes: int | None = None):
        image = scan["image"]
        axes, _, self.factors = spatial_levels(scan)
        dims = tuple(a["name"] for a in axes)
        self.source = level0
        # a class map of K classes holds 0..K-1 (K == 1: a threshold, 0 or 1)
        self.values = np.arange(max(classes, 2), dtype=level0.dtype) if classes else None
        self.levels: list[zarr.Array] = []
        for n in range(len(self.factors) + 1):
            self.levels.append(target.create_array(
                str(n), shape=tuple(image[str(n)].shape[1:]), dtype=level0.dtype,
                chunks=tuple(image[str(n)].chunks[1:]), compressors=COMPRESSOR, fill_value=0,
                dimension_names=dims, overwrite=True))
        # the same bytes copied where reading them back is local; on object storage a second encode
        # of the finished buffer costs less than a GET per chunk
        self.same_encoding = _same_encoding(level0, self.levels[0])
        self.copy_bytes = self.same_encoding and storage.local_bytes(level0)
        # local levels: each chunk encoded in the writing thread (tasks.chunk_io), else through zarr
        self._codecs = [ChunkCodec.for_array(level) for level in self.levels]
        self._lock = threading.Lock()
        # (level, chunk) -> [buffer, parts still to come]: only chunks begun and not yet written
        self._pending: dict[tuple[int, tuple[int, ...]], list] = {}
        # per level >= 1 and axis: how many chunks of the level above feed each chunk (a chunk's
        # count is the product over its axes, taken when its first part comes)
        self._feeds = [None] + [
            [_axis_counts(np_, cp, k, nn, cn) for np_, cp, k, nn, cn
             in zip(self.levels[n - 1].shape, self.levels[n - 1].chunks, self.factors[n - 1],
                    self.levels[n].shape, self.levels[n].chunks)]
            for n in range(1, len(self.levels))]
        self._written0 = 0
        self._chunks0 = int(np.prod([_ceil_div(n, c) for n, c in zip(level0.shape, level0.chunks)]))

    @staticmethod
    def applies(scan: zarr.Group) -> bool:
        """No block of any level straddles two chunks of the level above."""
        image = scan["image"]
        _, _, factors = spatial_levels(scan)
        for n, f in enumerate(factors):
            prev = image[str(n)]
            for size, chunk, k in zip(prev.shape[1:], prev.chunks[1:], f):
                if chunk % k and chunk < size:
                    return False
        return True

    def add(self, box: Box, labels: np.ndarray, encoded: bytes | None | object = NOT_GIVEN) -> None:
        """Level-0 chunk ``box`` of ``prediction/labels`` has been written with ``labels``;
        ``encoded``: the bytes stored for it (``ChunkCodec.write``; None: not stored, all fill
        value), stored again as they are, when level 0 is encoded alike."""
        coords = tuple(b.start // c for b, c in zip(box, self.source.chunks))
        if encoded is not NOT_GIVEN and self.same_encoding and self._codecs[0] is not None:
            self._codecs[0].put(coords, encoded)
        elif self.copy_bytes:
            _copy_chunk(self.source, self.levels[0], coords)
        else:
            self.levels[0][box] = labels
        with self._lock:
            self._written0 += 1
        self._push(1, box, labels)

    def _push(self, n: int, box: Box, block: np.ndarray) -> None:
        if n >= len(self.levels):
            return
        f, level = self.factors[n - 1], self.levels[n]
        down = downsample_mode(block, f, self.values)
        lo = [b.start // k for b, k in zip(box, f)]
        ready = []
        chunk_ranges = [range(a // c, (a + m - 1) // c + 1) for a, m, c in zip(lo, down.shape, level.chunks)]
        for index in itertools.product(*chunk_ranges):
            cbox = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, level.chunks, level.shape))
            dst = tuple(slice(max(cb.start, a) - cb.start, min(cb.stop, a + m) - cb.start)
                        for cb, a, m in zip(cbox, lo, down.shape))
            src = tuple(slice(max(cb.start, a) - a, min(cb.stop, a + m) - a) for cb, a, m in zip(cbox, lo, down.shape))
            with self._lock:
                key = (n, index)
                entry = self._pending.get(key)
                if entry is None:
                    parts = int(np.prod([c[i] for c, i in zip(self._feeds[n], index)]))
                    entry = self._pending[key] = [np.zeros([s.stop - s.start for s in cbox], level.dtype), parts]
                entry[0][dst] = down[src]
                entry[1] -= 1
                if entry[1] == 0:
                    ready.append((cbox, self._pending.pop(key)[0]))
        for cbox, buffer in ready:
            if self._codecs[n] is not None:
                self._codecs[n].write(tuple(b.start // c for b, c in zip(cbox, level.chunks)), buffer)
            else:
                level[cbox] = buffer
            self._push(n + 1, cbox, buffer)

    @property
    def complete(self) -> bool:
        with self._lock:
            # every level-0 chunk in and no chunk above waiting for a part: every level is written
            return self._written0 == self._chunks0 and not self._pending


def _same_encoding(a: zarr.Array, b: zarr.Array) -> bool:
    ma, mb = a.metadata.to_dict(), b.metadata.to_dict()
    keys = ("shape", "data_type", "chunk_grid", "chunk_key_encoding", "codecs", "fill_value")
    return all(ma.get(k) == mb.get(k) for k in keys)


def _copy_chunk(src: zarr.Array, dst: zarr.Array, coords: tuple[int, ...]) -> None:
    """The stored bytes of one chunk, copied as they are (an absent chunk, all fill value, stays absent)."""
    data = storage.read_chunk_bytes(src, coords)
    if data is not None:
        storage.write_chunk_bytes(dst, coords, data)

"""A raster read in whole rows (a striped GeoTIFF) is streamed with its slab held packed.

``to_zarr._stream(..., pack=True)`` reads pieces of rows in a background thread, packs each
piece's windows LZ4-compressed, and hands every window out, unpacked, once its slab is whole; the
next slab is read while this one is written, at the pace its windows are freed. The windows must be
exactly those of the plain stream, in the same order, and the read-ahead must stay bounded.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from tasks.ingest import to_zarr


class RowsReader:
    """A reader of whole rows only (like a striped GeoTIFF), over an array held in memory."""

    windowed = False

    def __init__(self, data: np.ndarray, log: list | None = None):
        self.data = data
        self.shape = data.shape
        self.dtype = data.dtype
        self.log = log

    def read_slab(self, start: int, stop: int) -> np.ndarray:
        if self.log is not None:
            self.log.append(("read", start, stop))
        return self.data[:, start:stop].copy()


def _windows(reader, step: int, width: int, pack: bool) -> list:
    got = []
    to_zarr._stream(reader, step, lambda start, stop, lo, hi, block: got.append((start, stop, lo, hi, block.copy())),
                    width, pack=pack)
    return got


@pytest.mark.parametrize("shape, step, width, piece", [
    ((3, 70, 50), 16, 8, 600),  # last slab short (6 rows), last window short (2 columns), pieces of 2 rows
    ((1, 64, 64), 32, 16, 4096),  # pieces as large as a slab
    ((2, 33, 40), 8, 20, 480),  # pieces that do not divide the slab (3 + 3 + 2 rows)
])
def test_packed_windows_are_the_plain_streams_windows_in_its_order(monkeypatch, shape, step, width, piece):
    monkeypatch.setattr(to_zarr, "WINDOW_BYTES", piece)  # bytes of a piece of rows (uint16)
    data = np.random.default_rng(0).integers(0, 4000, shape, dtype=np.uint16)
    packed = _windows(RowsReader(data), step, width, pack=True)
    plain = _windows(RowsReader(data), step, width, pack=False)
    assert [w[:4] for w in packed] == [w[:4] for w in plain]
    for start, stop, lo, hi, block in packed:  # against the array itself, not the other stream
        np.testing.assert_array_equal(block, data[:, start:stop, lo:hi])
    covered = np.zeros(shape[1:], dtype=int)
    for start, stop, lo, hi, _ in packed:
        covered[start:stop, lo:hi] += 1
    assert (covered == 1).all()


def test_the_next_slab_is_read_while_this_one_is_written_and_no_faster(monkeypatch):
    """Slabs of 8 rows in pieces of 1 row (8 pieces), 4 windows each. Before window w of a slab is
    handed out, at most 1 + 2 w pieces of the next slab may have been read (its windows' share,
    plus one read ahead); and writing the windows (slowed here) leaves the reader time to read the
    next slab, so some of it is read before this slab's last window."""
    height, width = 32, 16
    data = np.arange(height * width, dtype=np.uint16).reshape(1, height, width)
    monkeypatch.setattr(to_zarr, "WINDOW_BYTES", width * 2)  # one row per piece
    log: list = []
    lock = threading.Lock()
    reader = RowsReader(data, log)

    def consume(start, stop, lo, hi, block):
        with lock:
            log.append(("write", start, lo))
        time.sleep(0.02)

    to_zarr._stream(reader, 8, consume, 4, pack=True)
    writes = [e for e in log if e[0] == "write"]
    assert len(writes) == 4 * 4
    for k in range(3):  # slab k's windows against slab k + 1's reads
        next_rows = range(8 * (k + 1), 8 * (k + 2))
        for w in range(4):
            at = log.index(("write", 8 * k, 4 * w))
            ahead = sum(1 for e in log[:at] if e[0] == "read" and e[1] in next_rows)
            assert ahead <= 1 + 2 * w, (k, w, ahead)
        last = log.index(("write", 8 * k, 12))
        assert any(e[0] == "read" and e[1] in next_rows for e in log[:last]), k

"""Whole chunks of a local Zarr array encoded or decoded in the calling thread.

``array[box] = data`` in zarr-python 3 goes through its event loop: the calling thread hands the
write to the loop's thread, the codec pipeline encodes, the local store writes through another
thread, and the caller waits for all three. For the engine's hot writes -- one whole output chunk
at a time, from several writer threads -- that round trip cost about as much as the encode itself
(3.3 ms a float16 512² chunk through zarr, 2.0 ms encoded here and stored with the store's
synchronous ``set``). ``ChunkCodec`` does the same work where zarr would: the ``bytes`` codec
(little endian, C order) then Blosc, with numcodecs' Blosc, whose bytes are zarr's own (tested
byte for byte, ``tests/test_chunk_io.py``); an edge chunk is padded with the fill value to the
full chunk shape, and a chunk that is all fill value is not stored (its key removed), as zarr does
with ``write_empty_chunks=False``. A chunk of a local folder is written as its file, in place
(``_put_file``).

It applies only where that is all the array asks for: a local store, the regular chunk grid, codecs
exactly ``bytes`` + ``blosc`` (no filters, no sharding), C order, a fill value; else ``for_array``
gives None and the caller writes through zarr.
"""

from __future__ import annotations

import os

import numpy as np
import zarr

from tasks import storage


def _folder(array: zarr.Array) -> str | None:
    """The folder of ``array``'s chunk files when it lives in a local folder (zarr's LocalStore)
    opened for writing; None leaves the writes to the store (which refuses them when read-only)."""
    from zarr.storage import LocalStore

    store_path = array.store_path
    if not isinstance(store_path.store, LocalStore) or store_path.store.read_only:
        return None
    return os.path.join(str(store_path.store.root), *filter(None, store_path.path.split("/")))


def _put_file(path: str, encoded: bytes | None) -> None:
    """Write (or, for None, remove) one chunk file in place.

    zarr's LocalStore writes every chunk to a temporary file in the chunk's folder and renames it:
    two directory entries and a rename under the folder's lock per chunk, and the two encoding
    threads then queue on that lock. tilewise writes a chunk only into an array no reader takes
    as done (a new ingest group, an output before its completion mark) and marks a chunk done only
    after its write returned, so a chunk cut short by a crash is written again by the next run;
    the rename bought nothing here.
    """
    if encoded is None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    try:
        f = open(path, "wb")
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        f = open(path, "wb")
    with f:
        f.write(encoded)


class ChunkCodec:
    """Encode / decode one whole chunk of ``array`` the way its codecs say (see module docstring)."""

    def __init__(self, array: zarr.Array, blosc: dict):
        from numcodecs import Blosc

        self.array = array
        self.dtype = np.dtype(array.dtype).newbyteorder("<")
        self.chunks = tuple(array.chunks)
        self.shape = tuple(array.shape)
        self.fill = np.array(array.fill_value, dtype=self.dtype)
        shuffle = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}
        self.blosc = Blosc(cname=blosc["cname"], clevel=int(blosc["clevel"]), shuffle=shuffle[blosc["shuffle"]],
                           blocksize=int(blosc.get("blocksize") or 0))
        self.typesize = int(blosc.get("typesize") or self.dtype.itemsize)
        self.folder = _folder(array)

    @classmethod
    def for_array(cls, array: zarr.Array) -> "ChunkCodec | None":
        """A codec for ``array``'s chunks, or None when zarr must do the work (see module docstring)."""
        if not storage.local_bytes(array):
            return None
        meta = array.metadata.to_dict()
        if meta.get("zarr_format") != 3 or meta.get("chunk_grid", {}).get("name") != "regular":
            return None
        codecs = [c if isinstance(c, dict) else c.to_dict() for c in meta.get("codecs", ())]
        if len(codecs) != 2 or codecs[0].get("name") != "bytes" or codecs[1].get("name") != "blosc":
            return None
        if (codecs[0].get("configuration") or {}).get("endian", "little") != "little":
            return None
        if array.order != "C" or array.fill_value is None or np.dtype(array.dtype).kind not in "biuf":
            return None
        config = getattr(getattr(array, "_async_array", None), "config", None)
        if config is None or getattr(config, "write_empty_chunks", True):
            return None  # zarr stores all-fill chunks there (or we cannot tell): leave it to zarr
        codec = cls(array, codecs[1].get("configuration") or {})
        if codec.typesize != codec.dtype.itemsize:
            return None
        return codec

    def _full(self, coords: tuple[int, ...], data: np.ndarray) -> np.ndarray:
        """``data`` (the chunk's part inside the array) as a C-ordered full chunk in the stored dtype."""
        data = np.asarray(data)
        if data.shape == self.chunks:
            return np.ascontiguousarray(data, dtype=self.dtype)
        want = tuple(min(c, n - i * c) for i, c, n in zip(coords, self.chunks, self.shape))
        if data.shape != want:
            raise ValueError(f"chunk {coords} of {self.array.path} holds {want}, got {data.shape}")
        full = np.full(self.chunks, self.fill, dtype=self.dtype)
        full[tuple(slice(0, n) for n in want)] = data
        return full

    def encode(self, coords: tuple[int, ...], data: np.ndarray) -> bytes | None:
        """The stored bytes of chunk ``coords`` holding ``data`` (clipped at the array's edge), or
        None when it is all fill value (not stored)."""
        full = self._full(coords, data)
        if self._all_fill(full):
            return None
        return self.blosc.encode(full)

    def _all_fill(self, full: np.ndarray) -> bool:
        """Every value is the fill value (NaN counts as equal to a NaN fill, as zarr counts it)."""
        if self.fill.dtype.kind == "f" and np.isnan(self.fill):
            return bool(np.isnan(full).all())
        if self.fill.dtype.kind == "f" and self.fill == 0:
            # zarr compares a zero fill by its bits (a chunk of -0.0 is stored under a +0.0 fill);
            # as integers this is also 14x faster for float16, which numpy compares without SIMD
            # (1 ms a 512² chunk pair, a second over a 16384² prediction)
            unsigned = f"u{full.dtype.itemsize}"
            return not np.any(full.view(unsigned) != self.fill.view(unsigned))
        return not np.any(full != self.fill)

    def put(self, coords: tuple[int, ...], encoded: bytes | None) -> None:
        """Store ``encoded`` (from :meth:`encode`, of this array or one encoded alike) as chunk
        ``coords``; None removes the chunk (all fill value)."""
        name = self.array.metadata.encode_chunk_key(coords)
        if self.folder is not None:
            _put_file(os.path.join(self.folder, name), encoded)
            return
        from zarr.core.buffer import default_buffer_prototype

        key = self.array.store_path / name
        if encoded is None:
            key.delete_sync()
        else:
            key.set_sync(default_buffer_prototype().buffer.from_bytes(encoded))

    def write(self, coords: tuple[int, ...], data: np.ndarray) -> bytes | None:
        """Store ``data`` as chunk ``coords`` (a whole chunk, clipped at the array's edge); returns
        what was stored (None: nothing, all fill value)."""
        encoded = self.encode(coords, data)
        self.put(coords, encoded)
        return encoded

    def read(self, coords: tuple[int, ...]) -> np.ndarray:
        """Chunk ``coords``: its part inside the array, decoded (fill value where it is not stored)."""
        from zarr.core.buffer import default_buffer_prototype

        key = self.array.store_path / self.array.metadata.encode_chunk_key(coords)
        want = tuple(slice(0, min(c, n - i * c)) for i, c, n in zip(coords, self.chunks, self.shape))
        stored = key.get_sync(prototype=default_buffer_prototype())
        if stored is None:
            return np.full(self.chunks, self.fill, dtype=self.dtype)[want]
        full = np.empty(self.chunks, dtype=self.dtype)
        self.blosc.decode(stored.to_bytes(), out=full)
        return full[want]

    def parts(self, origin: tuple[int, ...], data: np.ndarray) -> list[tuple[tuple[int, ...], np.ndarray]] | None:
        """``data`` placed at ``origin`` cut into (chunk coords, part), or None when it is not made
        of whole chunks (clipped at the array's edges)."""
        import itertools

        for o, n, c, size in zip(origin, data.shape, self.chunks, self.shape):
            if o % c or ((o + n) % c and o + n != size):
                return None
        return [(tuple((o + r) // c for o, r, c in zip(origin, rel, self.chunks)),
                 data[tuple(slice(r, r + c) for r, c in zip(rel, self.chunks))])
                for rel in itertools.product(*(range(0, n, c) for n, c in zip(data.shape, self.chunks)))]

    def write_box(self, box: tuple[slice, ...], data: np.ndarray) -> None:
        """Store ``data`` over ``box``, a union of whole chunks (e.g. every class of one spatial
        chunk): each chunk is written with :meth:`write`."""
        parts = self.parts(tuple(b.start or 0 for b in box), data)
        if parts is None:
            raise ValueError(f"{box} is not made of whole chunks of {self.array.path}")
        for coords, part in parts:
            self.write(coords, part)

"""Ingest one scan into a Zarr v3 scan group, streaming slab by slab.

Layout written (see README, "Zarr layout"):

    SCAN.zarr/                      group; attrs["tilewise"] = metadata, provenance, completion mark;
                                    attrs["ome"] = the image's multiscales with paths image/0, image/1...
      image/                        OME-NGFF 0.5 multiscale image, axes (c, z, y, x) or (c, y, x)
        0/ 1/ ...                   pyramid levels, Blosc-zstd, chunks aligned across levels
      labels/                       NGFF labels group, attrs["ome"]["labels"] = ["reference", ...]
        reference/                  when labels exist: NGFF image-label, 0/ 1/ ... class indices (uint8) on
                                    the image pyramid's grid (tasks/ingest/reference.py)

Ingest streams windows: a slab (one chunk row along the first spatial axis, Z or Y for rasters;
two for a raster read in windows) cut along the second axis into ~4 MB windows of whole chunks.
Where the reader reads windows on their own (plain .nii, uncompressed TIFF pages, tiled TIFF and
GeoTIFF) peak memory is a few windows plus the pyramid chunks not yet whole (those no window is
filling now kept LZ4-compressed); a source that can only be read front to back or in whole rows
(.nii.gz, compressed pages, slice folders, striped GeoTIFF) also holds one slab, gathered from
~4 MB pieces -- LZ4-packed where it is a raster of integer samples (a striped GeoTIFF). Neither
depends on the number of slices or rows.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zarr
from numcodecs import Blosc
from zarr.codecs import BloscCodec

from tasks import identity, storage
from tasks.chunk_io import ChunkCodec
from tasks.memory import release_free_memory
from tasks.errors import ScanError
from tasks.export.ngff import write_root_multiscales
from tasks.ingest import remote
from tasks.ingest.discover import LabelSpec, ScanSpec
from tasks.ingest.pyramid import PyramidPlan, downsample_mean, plan_pyramid
from tasks.ingest.readers import ScanReader, default_reader_kind, json_number, open_reader
from tasks.ingest.reference import migrate_reference, reference_arrays, write_reference_levels
from tasks.version import tilewise_version

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Spatial chunk shape per modality, array order. Ingest streams one chunk row along the first axis
# at a time, so the first size sets the memory per slab. MRI: 32 slices of 64 x 64 (a 3D tile reads
# a few); EM: one section of 512 x 512 (serial-section stacks are anisotropic and segmented
# section by section); satellite: the COG-style 512 x 512 block.
DEFAULT_CHUNKS = {"mri": (32, 64, 64), "em": (1, 512, 512), "satellite": (512, 512)}
COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")
PYRAMID_COMPRESSOR = BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")


@dataclass(frozen=True)
class IngestResult:
    scan_id: str
    store: str
    status: str  # "ingested" | "unchanged"
    shape: tuple[int, ...] = ()
    seconds: float = 0.0
    message: str = ""


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    """The file's sha256 through one reused 1 MiB buffer (beside an ingest, the hash thread then
    holds 1 MiB instead of the 8 MiB blocks that ``f.read`` would allocate afresh)."""
    digest = hashlib.sha256()
    buffer = bytearray(block)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])  # hashlib releases the GIL for buffers this large
    return digest.hexdigest()


def _source_files(sources: tuple[Path, ...]) -> list[tuple[Path, str]]:
    """Every file of ``sources`` in reading order, with its name relative to the scan: a file's own
    name, ``folder/slice`` for the slices of a folder."""
    files: list[tuple[Path, str]] = []
    for s in sources:
        if s.is_dir():
            files.extend((p, f"{s.name}/{p.name}") for p in sorted(s.iterdir())
                         if p.is_file() and not p.name.startswith("."))
        elif s.exists():
            files.append((s, s.name))
    return files


def _stat_files(files: list[tuple[Path, str]], role: str) -> list[dict[str, Any]]:
    out = []
    for f, name in files:
        st = f.stat()
        out.append({"role": role, "name": name, "path": str(f.resolve()), "size": st.st_size,
                    "mtime_ns": st.st_mtime_ns})
    return out


# What describes a source file without reading it: local files have size and mtime_ns, remote
# objects (path = their URL) size, etag and mtime as listed. An entry may carry "local", the
# fetched copy of a remote object to hash; it is never recorded. "role" (image | labels) and "name"
# (relative to the scan) with the sha256 are what the file IS; "path" only where it was.
METADATA_KEYS = ("size", "mtime_ns", "etag", "mtime")


def _listed_files(listed: remote.RemoteScan, role: str) -> list[dict[str, Any]]:
    parent = listed.parent()
    return [{"role": role, "name": o.url[len(parent) + 1:] if o.url.startswith(parent + "/") else o.url,
             **o.record()} for o in listed.objects]


def _scan_files(spec: ScanSpec) -> list[dict[str, Any]]:
    """The entry of every file the scan (and its labels) is made of, in reading order (channel
    order counts), from metadata only."""
    parts = [("image", spec.sources, spec.remote)]
    if spec.labels is not None:
        parts.append(("labels", spec.labels.sources, spec.labels.remote))
    files: list[dict[str, Any]] = []
    for role, sources, listed in parts:
        files += _listed_files(listed, role) if listed else _stat_files(_source_files(sources), role)
    return files


def _same_metadata(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """The metadata says these are the same bytes: the same file or object (path or URL) with the
    same ETag (and size) when there is one (an object's mtime moves when identical bytes are
    written again), else the same size and mtime."""
    if old.get("path") != new.get("path"):
        return False
    if old.get("etag") or new.get("etag"):
        return (old.get("etag"), old.get("size")) == (new.get("etag"), new.get("size"))
    if new.get("mtime_ns") is None and new.get("mtime") is None:
        return False  # a size alone does not name the bytes
    return all(old.get(k) == new.get(k) for k in ("size", "mtime_ns", "mtime"))


def _name(f: dict[str, Any]) -> str:
    """The file's name relative to the scan (groups ingested before names were recorded: the
    last part of its path)."""
    return f.get("name") or str(f.get("path", "")).rstrip("/").rpartition("/")[2]


def _recorded(f: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in f.items() if k != "local"}


def _options_digest(spec: ScanSpec, kind: str, chunks: tuple[int, ...]) -> str:
    labels = None if spec.labels is None else {
        "mapping": {str(k): v for k, v in sorted(spec.labels.mapping.items())},
        "classes": list(spec.labels.classes)}
    return identity.ingest_options(format_version=FORMAT_VERSION, reader=kind, chunks=list(chunks),
                                   spacing=spec.spacing, unit=spec.unit, channel_names=spec.channel_names,
                                   labels=labels)


def _legacy_options_digest(spec: ScanSpec, kind: str, chunks: tuple[int, ...]) -> str:
    """The options digest of groups ingested before label files were compared by content: it named
    the label files by path. Such a group matching it has the options of today's digest."""
    options = {"format_version": FORMAT_VERSION, "reader": kind, "chunks": list(chunks), "spacing": spec.spacing,
               "unit": spec.unit, "channel_names": spec.channel_names,
               "labels": None if spec.labels is None else {
                   "sources": [str(p) for p in spec.labels.sources],
                   "mapping": {str(k): v for k, v in sorted(spec.labels.mapping.items())},
                   "classes": list(spec.labels.classes)}}
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()


def _unchanged(record: dict[str, Any] | None, files: list[dict[str, Any]], options: tuple[str, ...],
               read: bool = True) -> bool:
    """True when a complete group was made from these very bytes, in this order, with these
    options (any of ``options``: today's digest, or the legacy one of the same options), by code
    whose output for this scan has not changed since (``identity.outdated``).

    The files are compared position by position (channel order matters) by role, name relative
    to the scan and sha256 -- not by path: the same bytes under another checkout or mount are the
    same scan. The same path with the same metadata (see :func:`_same_metadata`) spares the
    hashing. Otherwise the bytes decide, unless ``read`` is False (a remote object not fetched
    yet): then it counts as changed.
    """
    if not record or not record.get(storage.COMPLETE_KEY):
        return False
    done = record[storage.COMPLETE_KEY]
    if done.get("options_digest") not in options or identity.outdated("ingest", record):
        return False
    old = record.get("source", {}).get("files", [])
    if len(old) != len(files):
        return False
    for o, f in zip(old, files):
        if (o.get("role", f["role"]), _name(o)) != (f["role"], f["name"]):
            return False
        if not _same_metadata(o, f):
            if not read or o["size"] != f["size"] or o.get("sha256") != sha256_file(Path(f.get("local", f["path"]))):
                return False
    return True


def _refresh_stats(store: str, record: dict[str, Any], files: list[dict[str, Any]], options: str) -> None:
    """After ``_unchanged`` said yes: store the files' current location and metadata (their sha256
    kept) and today's options digest, so a moved or touched-but-identical file is hashed once, not
    on every run. Caller holds the lock."""
    old = record.get("source", {}).get("files", [])
    new = [{**o, "role": f["role"], "name": f["name"], "path": f["path"],
            **{k: f[k] for k in METADATA_KEYS if k in f}} for o, f in zip(old, files)]
    done = record.get(storage.COMPLETE_KEY) or {}
    if new == old and done.get("options_digest") == options:
        return
    group = storage.open_group(store, mode="r+")
    attrs = dict(group.attrs.get(storage.ATTRS_KEY, {}))
    attrs["source"] = {**attrs.get("source", {}), "files": new}
    attrs[storage.COMPLETE_KEY] = {**attrs[storage.COMPLETE_KEY], "options_digest": options}
    group.attrs[storage.ATTRS_KEY] = attrs
    log.info("%s: sources moved or touched but unchanged (same ETag or sha256); stored their new metadata", store)


def chunks_for(spec: ScanSpec, spatial_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Spatial chunk shape: the catalog's, else the modality default, fitted to the scan's rank."""
    wanted = spec.chunks or DEFAULT_CHUNKS[spec.modality]
    if len(wanted) < len(spatial_shape):
        wanted = (1,) * (len(spatial_shape) - len(wanted)) + tuple(wanted)
    wanted = tuple(wanted)[-len(spatial_shape):]
    return tuple(max(1, min(c, n)) for c, n in zip(wanted, spatial_shape))


def _axes_metadata(axes: str, unit: str | None) -> list[dict[str, str]]:
    out = []
    for name in axes:
        if name == "c":
            out.append({"name": "c", "type": "channel"})
        else:
            item = {"name": name, "type": "space"}
            if unit:
                item["unit"] = unit
            out.append(item)
    return out


class _SlabStats:
    """Counts of NaN / ±Inf and the value range, accumulated slab by slab."""

    def __init__(self, floating: bool):
        self.floating = floating
        self.nan = self.posinf = self.neginf = 0
        self.min = math.inf
        self.max = -math.inf

    def update(self, slab: np.ndarray) -> None:
        if slab.size == 0:
            return
        low, high = float(slab.min()), float(slab.max())
        if self.floating and not (math.isfinite(low) and math.isfinite(high)):
            # NaN propagates through min/max, so only slabs holding NaN or Inf pay for the counts
            self.nan += int(np.isnan(slab).sum())
            self.posinf += int(np.isposinf(slab).sum())
            self.neginf += int(np.isneginf(slab).sum())
            finite = slab[np.isfinite(slab)]
            if not finite.size:
                return
            low, high = float(finite.min()), float(finite.max())
        self.min = min(self.min, low)
        self.max = max(self.max, high)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"min": json_number(self.min) if self.min != math.inf else None,
                             "max": json_number(self.max) if self.max != -math.inf else None}
        if self.floating:
            d.update(nan_count=self.nan, posinf_count=self.posinf, neginf_count=self.neginf)
        return d


def _slabs(length: int, step: int):
    for start in range(0, length, step):
        yield start, min(start + step, length)


WINDOW_BYTES = 4 << 20
READ_AHEAD = 1  # windows (or pieces of a slab) read ahead


def window_width(shape: tuple[int, ...], rows: int, itemsize: int, multiple: int) -> int:
    """Width along the second spatial axis (axis 2 of a channel-first array: Y of a volume, X of a
    raster) of a window of about ``WINDOW_BYTES`` holding ``rows`` rows of the first: a multiple of
    ``multiple`` (whole chunks, whole pyramid blocks), at least one multiple."""
    if len(shape) < 3:
        return 1
    per_index = shape[0] * rows * math.prod(shape[3:]) * itemsize
    width = max(1, WINDOW_BYTES // max(per_index, 1) // multiple) * multiple
    return min(width, shape[2])


def _stream_packed(reader: ScanReader, slabs: list[tuple[int, int]], pieces: list[list[tuple[int, int]]],
                   windows: list[tuple[int, int]], consume: Callable[[int, int, int, int, np.ndarray], None]) -> None:
    """:func:`_stream` of a reader read in whole rows, holding each slab packed (see there); ``pieces``
    are each slab's reads (rows [a, b)). Pieces of ~``WINDOW_BYTES``, as unpacked slabs read them:
    1 MiB ones (parts of ~11 KB a band) took 2-3 CPU-s more on a 1 GiB striped scene, for 2 MB less."""
    shape = tuple(reader.shape)
    jobs = [job for slab in pieces for job in slab]
    ends = list(itertools.accumulate(len(slab) for slab in pieces))  # a slab's jobs end here

    def read(a: int, b: int) -> list[list[bytes]]:  # a piece, packed window by window, band by band
        block = reader.read_slab(a, b)
        return [[_PARK_CODEC.encode(np.ascontiguousarray(band[:, lo:hi])) for band in block] for lo, hi in windows]

    out: np.ndarray | None = None  # the one buffer a window is unpacked into
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tilewise-read") as pool:
        pending: deque[Future] = deque()
        submitted = 0

        def read_up_to(n: int) -> None:
            nonlocal submitted
            while submitted < min(n, len(jobs)):
                pending.append(pool.submit(read, *jobs[submitted]))
                submitted += 1

        for k, (start, stop) in enumerate(slabs):
            read_up_to(ends[k])
            packed = [pending.popleft().result() for _ in pieces[k]]
            following = len(pieces[k + 1]) if k + 1 < len(slabs) else 0
            for w, (lo, hi) in enumerate(windows):
                # The next slab is read while this one is written, at the pace its windows are
                # freed: one slab packed is held, not two.
                read_up_to(ends[k] + READ_AHEAD + w * following // len(windows))
                held = (shape[0], stop - start, hi - lo, *shape[3:])
                if out is None or out.shape != held:
                    out = np.empty(held, dtype=reader.dtype)
                row = 0
                for (a, b), parts in zip(pieces[k], packed):
                    for band, part in zip(out, parts[w]):  # each band's rows are contiguous in ``out``
                        _PARK_CODEC.decode(part, out=band[row:row + b - a])
                    parts[w] = None  # this window's bytes go as it is written
                    row += b - a
                consume(start, stop, lo, hi, out)


def _stream(reader: ScanReader, step: int, consume: Callable[[int, int, int, int, np.ndarray], None],
            width: int | None = None, order: Callable[[int, int], Any] | None = None,
            pack: bool = False) -> None:
    """``consume(start, stop, lo, hi, block)`` for every window, in order: rows [start, stop) of
    the first spatial axis in slabs of ``step``, and [lo, hi) of the second in windows of ``width``
    (the whole axis when None); a slab's windows come before the next slab's. Where the reader
    reads windows on their own, ``order(start, lo)`` may sort them instead (a sort key).

    A background thread reads ahead while the caller writes, ``READ_AHEAD`` reads at a time. Where
    the reader reads windows on their own (``reader.windowed``) those are windows, so a slab is
    never held. Otherwise a slab is read in pieces of ~``WINDOW_BYTES`` along the first axis (a
    .nii.gz, a compressed page stack: sources read front to back) gathered into one slab, which
    is handed out window by window: one slab and a piece ahead, not two slabs.

    With ``pack``, such a slab of several windows is held packed instead: the read-ahead thread
    packs each piece's windows LZ4-compressed, band by band, as it reads them, and
    each window is unpacked into one reused buffer when the slab is whole (``consume`` must be
    done with ``block`` when it returns). A packed window's bytes are freed once it is written,
    and the next slab is read meanwhile at that pace, so reading and writing overlap.
    """
    shape = tuple(reader.shape)
    extent = shape[2] if len(shape) > 2 else 1
    width = extent if width is None else max(1, min(width, extent))
    windows = [(lo, min(lo + width, extent)) for lo in range(0, extent, width)]
    slabs = list(_slabs(shape[1], step))
    by_window = reader.windowed and len(windows) > 1
    if by_window:
        jobs = [(start, stop, lo, hi) for start, stop in slabs for lo, hi in windows]
        if order is not None:
            jobs.sort(key=lambda job: order(job[0], job[2]))
        read = reader.read_window
    else:
        per_row = shape[0] * math.prod(shape[2:]) * np.dtype(reader.dtype).itemsize
        piece = max(1, WINDOW_BYTES // max(per_row, 1))
        pieces = [[(a, min(a + piece, stop)) for a in range(start, stop, piece)] for start, stop in slabs]
        if pack and len(windows) > 1:
            _stream_packed(reader, slabs, pieces, windows, consume)
            return
        jobs = [job for slab in pieces for job in slab]
        read = reader.read_slab
    slab_of = {start: (start, stop) for start, stop in slabs}  # a slab's first piece -> the slab
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tilewise-read") as pool:
        pending: deque[Future] = deque(pool.submit(read, *job) for job in jobs[:READ_AHEAD])
        slab: np.ndarray | None = None
        current = (0, 0)
        for i, job in enumerate(jobs):
            block = pending.popleft().result()
            if i + READ_AHEAD < len(jobs):
                pending.append(pool.submit(read, *jobs[i + READ_AHEAD]))
            if by_window:
                consume(*job, block)
                del block
                continue
            a, b = job
            if a in slab_of:  # the first piece of a slab
                current = slab_of[a]
                if b == current[1]:  # the whole slab in one piece
                    slab = block
                else:
                    slab = np.empty((block.shape[0], current[1] - current[0], *block.shape[2:]), dtype=block.dtype)
            if slab is not block:
                slab[:, a - current[0] : b - current[0]] = block
            del block
            if b == current[1]:  # the slab is whole: hand it out
                start, stop = current
                for lo, hi in windows:
                    consume(start, stop, lo, hi, slab[:, :, lo:hi] if len(windows) > 1 else slab)
                slab = None


WRITE_PIECE_BYTES = 4 << 20
# Parked pyramid chunks (_PyramidWriter) and packed slabs (_stream_packed): LZ4 at level 1 with
# bit shuffle, 1-2 GB/s each way on one thread; on a Sentinel-2-like uint16 scene 1.75x smaller
# (byte shuffle: 1.66x).
_PARK_CODEC = Blosc(cname="lz4", clevel=1, shuffle=Blosc.BITSHUFFLE)
ENCODERS = 2  # threads encoding whole chunks of a local store (numcodecs' Blosc releases the GIL)


def _write_in_pieces(array: zarr.Array, start: int, rows: np.ndarray, lo: int = 0) -> None:
    """``array[:, start:start + n, lo:lo + m] = rows``, a few chunks at a time along the last axis.

    Zarr encodes every chunk of one assignment at once, holding a copy and the compressed bytes
    of each: writing a whole slab in one go would double its memory. Pieces of ~4 MB keep the
    encoder busy on both cores and the overhead small.
    """
    step = array.chunks[-1]
    per_column = rows.nbytes // max(1, -(-rows.shape[-1] // step))
    columns = max(1, WRITE_PIECE_BYTES // max(per_column, 1))
    stop = start + rows.shape[1]
    if rows.ndim > 3:  # (C, Z, Y, X): the window is along Y, the pieces along X
        head = (slice(None), slice(start, stop), slice(lo, lo + rows.shape[2]))
        offset = 0
    else:  # (C, Y, X): the window and the pieces are both along X
        head = (slice(None), slice(start, stop))
        offset = lo
    for x0 in range(0, rows.shape[-1], columns * step):
        x1 = min(x0 + columns * step, rows.shape[-1])
        array[head + (Ellipsis, slice(offset + x0, offset + x1))] = rows[..., x0:x1]


def _submit_chunks(codec: ChunkCodec, pool: ThreadPoolExecutor, start: int, rows: np.ndarray,
                   lo: int = 0) -> list[Future] | None:
    """The same write as :func:`_write_in_pieces`, each chunk encoded and stored on ``pool``
    (``tasks.chunk_io``), when ``rows`` is made of whole chunks (clipped at the array's edges): the
    chunks' jobs, to wait for; None, submitting nothing, when it is not."""
    origin = (0, start, lo, *([0] * (rows.ndim - 3))) if rows.ndim > 3 else (0, start, lo)
    parts = codec.parts(origin, rows)
    if parts is None:
        return None
    return [pool.submit(codec.write, coords, part) for coords, part in parts]


def _wait_all(jobs: list[Future]) -> None:
    """Wait for every job (all of them, even after one failed: none is left writing), then raise
    the first failure."""
    wait_futures(jobs)
    for job in jobs:
        job.result()


class _LevelReader:
    """A written pyramid level as the source of the next ones (same ``read_slab`` contract)."""

    windowed = True

    def __init__(self, array: zarr.Array):
        self.array = array
        self.shape = array.shape
        self.dtype = array.dtype

    def read_slab(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.array[:, start:stop])

    def read_window(self, start: int, stop: int, lo: int, hi: int) -> np.ndarray:
        return np.asarray(self.array[:, start:stop, lo:hi])


class _PyramidWriter:
    """Writes a window to level 0 and its block means to every lower level.

    A lower level gets fewer rows per slab than its chunks are deep, and windows narrower than its
    width; writing those directly would decode and re-encode each of its chunks several times, so
    its rows are gathered into one buffer per chunk and written when every window of that chunk is
    in (and at the end). A chunk a window left unfinished (the next slab completes it: a source
    read in whole rows, a volume's slabs) is parked: its filled rows kept LZ4-compressed until a
    later window comes back to it, so the held buffers are the current window's, not a chunk row
    of every level as wide as the scan.
    """

    def __init__(self, image: zarr.Group, channels: int, dtype: np.dtype, plan: PyramidPlan,
                 chunks: tuple[int, ...], dimension_names: tuple[str, ...], encoders: ThreadPoolExecutor | None = None):
        self.plan = plan
        self.arrays = [
            image.create_array(
                str(level), shape=(channels, *shape), dtype=dtype,
                chunks=(1, *(min(c, n) for c, n in zip(chunks, shape))),
                # Lower levels are small and smooth: a light zstd level costs little in size.
                compressors=COMPRESSOR if level == 0 else PYRAMID_COMPRESSOR,
                fill_value=0, dimension_names=dimension_names,
            )
            for level, shape in enumerate(plan.shapes)
        ]
        # (level, chunk row, chunk column) -> [buffer, values filled, rows filled (lo, hi), last window]
        self._buffers: dict[tuple[int, int, int], list] = {}
        # the same key -> (entry, its filled rows compressed): chunks no window is filling now
        self._parked: dict[tuple[int, int, int], tuple[list, bytes]] = {}
        self._window = 0
        # a local store's chunks encoded on two threads of ours (tasks.chunk_io), else through zarr
        self._codecs = [ChunkCodec.for_array(a) for a in self.arrays]
        self._pool = encoders
        if encoders is None:
            self._codecs = [None] * len(self.arrays)

    def _put(self, level: int, start: int, rows: np.ndarray, lo: int = 0, wait: bool = True) -> list[Future]:
        """Write ``rows`` to ``level``; with ``wait`` False, the chunk jobs still running (``rows``
        must stay unchanged until they are done)."""
        codec = self._codecs[level]
        jobs = _submit_chunks(codec, self._pool, start, rows, lo) if codec is not None else None
        if jobs is None:
            _write_in_pieces(self.arrays[level], start, rows, lo)
            return []
        if wait:
            _wait_all(jobs)
            return []
        return jobs

    def window_multiple(self, source: int = 0, last: int | None = None) -> int:
        """Windows of level ``source`` must be a multiple of this along the second spatial axis:
        whole chunks of ``source``, whole blocks of levels ``source + 1 .. last``."""
        m = 1
        last = len(self.arrays) - 1 if last is None else last
        for f in self.plan.factors[source:last]:
            m *= f[1] if len(f) > 1 else 1
        return math.lcm(m, self.arrays[source].chunks[2]) if self.arrays[source].ndim > 2 else 1

    def write(self, start: int, lo: int, block: np.ndarray, source: int = 0, last: int | None = None,
              beside: Callable[[np.ndarray], None] | None = None) -> None:
        """``block`` holds rows ``start..`` and columns ``lo..`` (second spatial axis) of level
        ``source``; write it if it is level 0, and its block means to levels ``source + 1 .. last``.
        Level 0's chunks encode on the pool while this thread computes the means and ``beside``
        (e.g. the statistics of ``block``): an encoder is not left idle meanwhile."""
        jobs = self._put(0, start, block, lo, wait=False) if source == 0 else []
        try:
            if beside is not None:
                beside(block)
            last = len(self.arrays) - 1 if last is None else last
            for level in range(source + 1, last + 1):
                factors = self.plan.factors[level - 1]
                block = downsample_mean(block, factors)
                start //= factors[0]
                lo //= factors[1] if len(factors) > 1 else 1
                self._append(level, start, lo, block)
            self._park_untouched()
        finally:
            _wait_all(jobs)
        self._window += 1

    def _park_untouched(self) -> None:
        """Compress the buffers of chunks this window did not fill (see the class docstring)."""
        for key in [k for k, e in self._buffers.items() if e[3] != self._window]:
            entry = self._buffers.pop(key)
            r0, r1 = entry[2]
            self._parked[key] = (entry, _PARK_CODEC.encode(np.ascontiguousarray(entry[0][:, r0:r1])))
            entry[0] = None

    def _entry(self, key: tuple[int, int, int], dtype: np.dtype) -> list:
        """Chunk ``key``'s buffer entry: the one being filled, a parked one brought back, or a new one."""
        entry = self._buffers.get(key)
        if entry is None:
            shape = self._shape_of(key)
            buffer = np.empty(shape, dtype=dtype)
            parked = self._parked.pop(key, None)
            if parked is None:
                entry = [buffer, 0, (shape[1], 0), self._window]
            else:
                entry, data = parked
                r0, r1 = entry[2]
                buffer[:, r0:r1] = np.frombuffer(_PARK_CODEC.decode(data), dtype=dtype).reshape(
                    (shape[0], r1 - r0, *shape[2:]))
                entry[0] = buffer
            self._buffers[key] = entry
        entry[3] = self._window
        return entry

    def _shape_of(self, key: tuple[int, int, int]) -> tuple[int, ...]:
        """The buffer of chunk ``key``: (channels, its rows, its columns, ...), clipped at the edges."""
        level, row, col = key
        array = self.arrays[level]
        held = min(array.chunks[1], array.shape[1] - row * array.chunks[1])
        if array.ndim < 3:
            return (array.shape[0], held, 1)
        column = array.chunks[2]
        return (array.shape[0], held, min(column, array.shape[2] - col * column), *array.shape[3:])

    def _append(self, level: int, start: int, lo: int, rows: np.ndarray) -> None:
        """Gather ``rows`` (rows ``start..``, columns ``lo..`` of the second spatial axis) into one
        buffer per chunk (chunk row x chunk column), and write each chunk once it is whole: only
        the chunks a window has begun and not finished are held, never a whole chunk row."""
        array = self.arrays[level]
        depth = array.chunks[1]
        column = array.chunks[2] if array.ndim > 2 else 1
        extent = array.shape[2] if array.ndim > 2 else 1
        width = rows.shape[2] if rows.ndim > 2 else 1
        while rows.shape[1]:
            row = start // depth
            first = row * depth
            held = min(depth, array.shape[1] - first)
            take = min(first + held - start, rows.shape[1])
            for col in range(lo // column, -(-(lo + width) // column)):
                c0, c1 = col * column, min((col + 1) * column, extent)
                a, b = max(lo, c0), min(lo + width, c1)
                key = (level, row, col)
                entry = self._entry(key, rows.dtype)
                r0, r1 = start - first, start - first + take
                entry[0][:, r0:r1, a - c0 : b - c0] = rows[:, :take, a - lo : b - lo]
                entry[1] += take * (b - a)
                entry[2] = (min(entry[2][0], r0), max(entry[2][1], r1))
                if entry[1] == held * (c1 - c0):
                    del self._buffers[key]
                    self._put(level, first, entry[0], c0)
            rows, start = rows[:, take:], start + take

    def flush(self) -> None:
        """Write what is left (there is nothing left once every window was written)."""
        for key in sorted([*self._buffers, *self._parked]):
            level, row, col = key
            array = self.arrays[level]
            buffer = self._entry(key, array.dtype)[0]
            self._put(level, row * array.chunks[1], buffer, col * (array.chunks[2] if array.ndim > 2 else 1))
            del self._buffers[key]


def _map_labels(values: np.ndarray, mapping: dict[int, int], path: str) -> np.ndarray:
    uniq, inverse = np.unique(values, return_inverse=True)
    targets = np.empty(len(uniq), dtype=np.uint8)
    for i, v in enumerate(uniq):
        if not float(v).is_integer() or int(v) not in mapping:
            known = ", ".join(str(k) for k in sorted(mapping))
            raise ScanError(path, f"label value {v} is not in the label mapping ({known})")
        targets[i] = mapping[int(v)]
    return targets[inverse].reshape(values.shape)


def _write_labels(group: zarr.Group, labels: LabelSpec, modality: str, image_shape: tuple[int, ...],
                  chunks: tuple[int, ...]) -> dict[str, Any]:
    kind = default_reader_kind(modality, list(labels.sources))
    recorded = list(labels.remote.source_urls()) if labels.remote is not None else [str(p) for p in labels.sources]
    with open_reader(list(labels.sources), kind) as reader:
        spatial = tuple(reader.shape[1:])
        if spatial != image_shape or reader.shape[0] != 1:
            raise ScanError(reader.path, f"label shape {reader.shape[1:]} (channels {reader.shape[0]}) "
                                         f"does not match the image's spatial shape {image_shape}")
        # level 0 of the NGFF label image; its pyramid follows the image's metadata (write_reference_levels)
        arr = group.require_group("labels").create_group("reference").create_array(
            "0", shape=spatial, dtype="uint8", chunks=chunks, compressors=COMPRESSOR,
            fill_value=0, dimension_names=tuple(reader.axes[1:]),
        )
        counts = np.zeros(len(labels.classes), dtype=np.int64)

        def consume(start: int, stop: int, lo: int, hi: int, block: np.ndarray) -> None:
            mapped = _map_labels(block[0], labels.mapping, reader.path)
            counts[:] += np.bincount(mapped.ravel(), minlength=len(counts))[: len(counts)]
            arr[start:stop, lo:hi] = mapped

        # np.unique's inverse is int64: windows of ~WINDOW_BYTES / 8 labels
        width = window_width(reader.shape, chunks[0], 8, chunks[1]) if len(chunks) > 1 else None
        _stream(reader, chunks[0], consume, width)
        return {"classes": list(labels.classes), "mapping": {str(k): v for k, v in sorted(labels.mapping.items())},
                "source": recorded, "class_voxels": counts.tolist()}


def ingest_scan(
    spec: ScanSpec,
    store: str | Path,
    *,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> IngestResult:
    """Ingest ``spec`` into the scan group at ``store`` (local path or fsspec URL).

    A complete group made from the same bytes with the same options is left alone (status
    "unchanged"); anything else there (an older version, a half-written group) is replaced.
    Raises :class:`ScanError` naming the file and the problem for bad input; on any failure the
    partial group is removed, so nothing incomplete is left looking like a result.

    The whole check-and-write holds the store's lock (``storage.store_lock``, purpose "ingest"):
    a second run on the same store waits ``$TILEWISE_LOCK_WAIT`` seconds (default 0) and then
    raises ``StoreBusy`` (a ScanError naming the holder); it never removes what the holder writes.

    A remote scan (``spec.remote``) whose objects have the metadata recorded at the last ingest
    is "unchanged" without fetching a byte; otherwise its objects are fetched (see
    :mod:`tasks.ingest.remote`) and it goes on as a local scan, recorded under its URLs.
    """
    store = str(store)
    t0 = time.perf_counter()
    stats_files = _scan_files(spec)
    if spec.remote is not None or (spec.labels is not None and spec.labels.remote is not None):
        if not force:
            shape = _unchanged_remote(spec, store, stats_files)
            if shape is not None:
                return IngestResult(spec.scan_id, store, "unchanged", shape, time.perf_counter() - t0)
        ingested = False
        try:
            local, urls = _fetch(spec, stats_files)
            try:
                result = _ingest_local(spec, local, store, stats_files, force, progress, t0)
            except ScanError as err:
                raise _named_by_url(err, urls) from None
            ingested = True
            return result
        finally:  # the local copies go once ingested; a failure keeps them for the retry (remote.py)
            remote.release(spec.remote, spec.labels.remote if spec.labels is not None else None, ingested=ingested)
    return _ingest_local(spec, spec, store, stats_files, force, progress, t0)


def _unchanged_remote(spec: ScanSpec, store: str, stats_files: list[dict[str, Any]]) -> tuple[int, ...] | None:
    """The recorded shape when the group is complete and was made with these options from objects
    with this very metadata, else None. Reads no object: the options use the recorded shape."""
    with storage.store_lock(store, purpose="ingest"):
        record = storage.read_record(store)
        kind = spec.reader_kind or (record or {}).get("source", {}).get("reader")
        shape = (record or {}).get("shape")
        if not kind or not shape:
            return None
        chunks = chunks_for(spec, tuple(shape[1:]))
        options = _options_digest(spec, kind, chunks)
        accepted = (options, _legacy_options_digest(spec, kind, chunks))
        if _unchanged(record, stats_files, accepted, read=False) and storage.is_complete(store):
            _refresh_stats(store, record, stats_files, options)
            migrate_reference(store)  # an older store's plain reference array, under this lock
            return tuple(shape)
    return None


def _fetch(spec: ScanSpec, stats_files: list[dict[str, Any]]) -> tuple[ScanSpec, dict[str, str]]:
    """``spec`` with local copies of its remote sources and labels, and the URL of each local
    source and copy. Each remote entry of ``stats_files`` gets its copy as "local" (to hash)."""
    copies: dict[str, Path] = {}
    urls: dict[str, str] = {}
    local = replace(spec, remote=None)
    if spec.remote is not None:
        sources, fetched = remote.fetch(spec.remote)
        copies.update(fetched)
        urls.update(zip(map(str, sources), spec.remote.source_urls()))
        local = replace(local, sources=sources)
    if spec.labels is not None and spec.labels.remote is not None:
        sources, fetched = remote.fetch(spec.labels.remote)
        copies.update(fetched)
        urls.update(zip(map(str, sources), spec.labels.remote.source_urls()))
        local = replace(local, labels=replace(spec.labels, sources=sources))  # remote kept: the labels' URLs
    for f in stats_files:
        if f["path"] in copies:
            f["local"] = str(copies[f["path"]])
            urls[f["local"]] = f["path"]
    return local, urls


def _named_by_url(err: ScanError, urls: dict[str, str]) -> ScanError:
    """A reader's error about a fetched copy (or a file in a fetched folder), naming the URL."""
    if type(err) is not ScanError:
        return err
    for path, url in urls.items():
        if err.path == path or err.path.startswith(path + os.sep):
            return ScanError(url + err.path[len(path):].replace(os.sep, "/"), err.problem)
    return err


def _ingest_local(spec: ScanSpec, local: ScanSpec, store: str, stats_files: list[dict[str, Any]], force: bool,
                  progress: Callable[[int, int], None] | None, t0: float) -> IngestResult:
    """``ingest_scan`` once every source is a local file: ``local`` is read, ``spec`` (its
    catalog form, URLs for remote sources) decides the options."""
    kind = spec.reader_kind or default_reader_kind(local.modality, list(local.sources))
    with open_reader(list(local.sources), kind) as reader:
        spatial_shape = tuple(reader.shape[1:])
        chunks = chunks_for(spec, spatial_shape)
        options = _options_digest(spec, kind, chunks)
        with storage.store_lock(store, purpose="ingest"):
            record = storage.read_record(store)
            # the mark's promise is checked too: a mark above missing arrays is not "unchanged"
            accepted = (options, _legacy_options_digest(spec, kind, chunks))
            if not force and _unchanged(record, stats_files, accepted) and storage.is_complete(store):
                _refresh_stats(store, record, stats_files, options)
                migrate_reference(store)  # an older store's plain reference array, under this lock
                return IngestResult(spec.scan_id, store, "unchanged", tuple(reader.shape), time.perf_counter() - t0)
            if storage.exists(store):
                if not storage.looks_like_group(store):
                    raise ScanError(store, "exists and is not a Zarr group; refusing to replace it")
                if record and record.get(storage.COMPLETE_KEY):
                    storage.clear_complete(store)  # the old result stops being 'complete' first
                    log.info("%s: source, options or arrays changed; re-ingesting", store)
                else:
                    log.warning("%s: replacing an incomplete group (an earlier run did not finish)", store)
                storage.remove(store)
            try:
                result = _write_scan(local, store, reader, kind, chunks, options, stats_files, progress)
            except BaseException:
                storage.remove(store)  # ours: the lock is held, no other run writes here
                raise
    return IngestResult(spec.scan_id, store, "ingested", result, time.perf_counter() - t0)


def _write_scan(spec: ScanSpec, store: str, reader: ScanReader, kind: str, chunks: tuple[int, ...],
                options: str, stats_files: list[dict[str, Any]],
                progress: Callable[[int, int], None] | None) -> tuple[int, ...]:
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_multiscales_metadata

    spacing = spec.spacing or reader.spacing
    if spacing is not None and len(spacing) != len(chunks):
        raise ScanError(reader.path, f"spacing {tuple(spacing)} has {len(spacing)} values but the scan has "
                                     f"{len(chunks)} spatial axes ({reader.axes[1:].upper()})")
    unit = spec.unit or reader.unit
    plan = plan_pyramid(tuple(reader.shape[1:]), spacing, chunks)
    first_pass = plan.single_pass_levels(chunks[0])
    # A raster read in whole rows (a striped GeoTIFF) holds a slab as wide as the scene. Integer
    # samples compress, so the slab is held packed (``_stream``), in windows of one chunk column
    # (unpacked one at a time). And each first-pass level would hold a row of unfinished chunks as
    # wide as the scene: only level 1 is built in the first pass, the coarser ones from level 1
    # read back in windows (the same means: they were computed from level 1's before too).
    pack = not reader.windowed and len(reader.shape) == 3 and np.issubdtype(reader.dtype, np.integer)
    if pack:
        first_pass = min(first_pass, 1)

    # Hash the sources beside the ingest (hashlib releases the GIL); provenance needs the bytes'
    # identity and reading them again afterwards would cost a second pass.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tilewise-hash") as hasher, \
            ThreadPoolExecutor(ENCODERS, thread_name_prefix="tilewise-encode") as encoders:
        digests = [hasher.submit(sha256_file, Path(f.get("local", f["path"]))) for f in stats_files]

        group = storage.open_group(store, mode="w")
        image = group.create_group("image")
        writer = _PyramidWriter(image, reader.shape[0], reader.dtype, plan, chunks, tuple(reader.axes), encoders)
        stats = _SlabStats(np.issubdtype(reader.dtype, np.floating))
        total = reader.shape[1]

        done = [0]  # windows written

        def consume(start: int, stop: int, lo: int, hi: int, block: np.ndarray) -> None:
            writer.write(start, lo, block, last=first_pass, beside=stats.update)
            done[0] += 1
            if done[0] % per_slab == 0 or done[0] == windows:
                # a slab's worth done: what its buffers left free in glibc's arenas goes back
                release_free_memory()
                if progress is not None:
                    progress(total * done[0] // windows, total)

        # Windows of whole chunks along the second spatial axis: the slab is never held whole
        # (where the reader reads windows) and every copy made of it is a window's size.
        extent = reader.shape[2] if len(reader.shape) > 2 else 1
        step = chunks[0]
        order = None
        if reader.windowed and len(reader.shape) == 3 and first_pass >= 1 and plan.factors[0][0] == 2:
            # A raster read in windows: windows two chunk rows high finish level 1's chunks as they
            # go, and taken chunk within chunk (plan.nested_order) every level 2.. holds one
            # unfinished chunk, not a row of them as wide as the scene.
            step = 2 * chunks[0]
            order = plan.nested_order(chunks, first_pass)
        multiple = writer.window_multiple(0, first_pass)
        width = window_width(reader.shape, step, np.dtype(reader.dtype).itemsize, multiple)
        if order is not None and width >= multiple:  # 2**j multiples: inside a level's chunk or over whole ones
            width = multiple << ((width // multiple).bit_length() - 1)
        if pack:
            width = min(multiple, extent)
        per_slab = -(-extent // width)
        windows = per_slab * -(-total // step)
        _stream(reader, step, consume, width, order, pack)
        writer.flush()
        if first_pass < plan.levels - 1:  # the coarse levels, from the last one written
            source = _LevelReader(writer.arrays[first_pass])
            multiple = plan.slab_multiple(first_pass)
            step2 = math.lcm(writer.arrays[first_pass].chunks[1], multiple)
            width2 = window_width(source.shape, step2, np.dtype(reader.dtype).itemsize,
                                  writer.window_multiple(first_pass))
            _stream(source, step2, lambda start, stop, lo, hi, block: writer.write(start, lo, block, source=first_pass),
                    width2)
            writer.flush()
        labels = (_write_labels(group, spec.labels, spec.modality, tuple(reader.shape[1:]), chunks)
                  if spec.labels else None)

        datasets = [
            {"path": str(level), "coordinateTransformations": [
                {"type": "scale", "scale": [1.0, *(float(s) for s in sp)]}]}
            for level, sp in enumerate(plan.spacings)
        ]
        write_multiscales_metadata(image, datasets, fmt=FormatV05(), axes=_axes_metadata(reader.axes, unit),
                                   name=spec.scan_id)
        write_root_multiscales(group)  # OME-Zarr readers opened at the group's root find the image
        if labels:
            write_reference_levels(group, labels)
        for f, d in zip(stats_files, digests):
            f["sha256"] = d.result()

    channel_names = list(spec.channel_names) if spec.channel_names else None
    spatial = reader.attributes()
    if channel_names is None and spatial.get("band_names") and all(spatial["band_names"]):
        channel_names = spatial["band_names"]
    record = {
        "format_version": FORMAT_VERSION,
        **identity.stamp("ingest"),
        "kind": "scan",
        "scan_id": spec.scan_id,
        "dataset": spec.dataset,
        "modality": spec.modality,
        "axes": reader.axes,
        "shape": list(reader.shape),
        "dtype": str(reader.dtype),
        "chunks": [1, *chunks],
        "spacing": None if spacing is None else [float(s) for s in spacing],
        "unit": unit,
        "channel_names": channel_names,
        "pyramid": {"levels": plan.levels, "shapes": [list(s) for s in plan.shapes], "downsampling": "block mean"},
        "spatial": spatial,
        "stats": stats.as_dict(),
        "labels": None if labels is None else {k: labels[k] for k in ("classes", "class_voxels", "source")},
        "warnings": list(reader.warnings),
        "source": {"reader": kind, "files": [_recorded(f) for f in stats_files]},
        "provenance": {
            "tilewise_version": tilewise_version(),
            "ingested_at": datetime.now(timezone.utc).isoformat(),
            "host": os.uname().nodename,
        },
    }
    group.attrs[storage.ATTRS_KEY] = record
    promised = [f"image/{level}" for level in range(plan.levels)] + (reference_arrays(group) if labels else [])
    storage.mark_complete(group, {"at": datetime.now(timezone.utc).isoformat(), "options_digest": options},
                          arrays=promised)
    return tuple(reader.shape)

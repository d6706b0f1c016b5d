"""Scan groups in Zarr: opening, the completion mark, removal, the per-store lock.

Storage contract (README "Zarr layout"): one Zarr v3 group per scan. A group is complete only when
its ``tilewise.complete`` attribute is present AND every array that mark vouches for is there with
the shape it lists (``complete.arrays``: ``{"image/0": [3, 4096, 4096], ...}``). The mark is
written last, after every array and every other attribute, and only after the arrays it lists
were checked to exist. Readers must ignore incomplete groups, and writers replace them.

Readers and writers of one store (tasks/store_lock.py): every writer (ingest, infer, CRF,
instances, NGFF label images, the evaluation's record) holds :func:`store_lock` for the whole
write, and takes every mark away before it touches an array (:func:`clear_complete`,
:func:`remove`: a crash half-way never leaves a mark above missing or rewritten chunks). Every
step that reads a prediction (export, evaluate, the instances' MLflow run) holds it shared for
the whole read, and records only what it read: it takes the record's :func:`marks` before reading
and checks them after (:func:`check_marks`), so a writer that ignored the lock is caught, not
recorded as the old result.

"Not there" and "cannot tell" are kept apart: :func:`read_record` returns None only when there is
no group (missing path, no ``zarr.json``, or a half-written one); a permission error, an I/O error
or a network error from fsspec propagates with its cause, so an outage is never read as "not
ingested".
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Iterable, Iterator

import fsspec
import zarr

from tasks.errors import ScanError
from tasks.store_lock import StoreBusy, lock_path, store_lock  # noqa: F401  (the storage API)

COMPLETE_KEY = "complete"
ATTRS_KEY = "tilewise"
ARRAYS_KEY = "arrays"  # in the mark: {path inside the group: shape} of every array it vouches for
# Marks written before the list existed vouch for these (checked for existence only).
LEGACY_PROMISES = {"scan": ("image/0",), "prediction": ("probabilities", "labels", "done")}


REFERENCE = "labels/reference"  # the reference labels' name: what evaluations record and compare


def reference(group: zarr.Group) -> zarr.Array | None:
    """The reference labels' level-0 array (uint8 class indices on the image's level-0 grid) of the
    scan ``group``, None when it has none. Every reader of the reference opens it here, in either
    layout: ``labels/reference/0`` (an NGFF image-label, ingest since issue 20) or the plain array
    ``labels/reference`` of stores ingested before (the next ingest migrates them,
    tasks/ingest/reference.py)."""
    try:
        node = group[REFERENCE]
    except KeyError:
        return None
    if isinstance(node, zarr.Array):
        return node
    try:
        level0 = node["0"]
    except KeyError:
        return None
    return level0 if isinstance(level0, zarr.Array) else None


def reference_record(group: zarr.Group) -> dict[str, Any]:
    """What ingest recorded about the reference (classes, mapping, source, class_voxels): the
    tilewise attributes of ``labels/reference``, the label image's group or the old plain array."""
    try:
        return dict(group[REFERENCE].attrs.get(ATTRS_KEY, {}))
    except KeyError:
        return {}


def chunk_boxes(shape: tuple[int, ...], chunks: tuple[int, ...]) -> Iterator[tuple[slice, ...]]:
    """Every chunk of an array of ``shape`` chunked by ``chunks``, as index boxes, raster order."""
    for corner in itertools.product(*(range(0, n, c) for n, c in zip(shape, chunks))):
        yield tuple(slice(a, min(a + c, n)) for a, c, n in zip(corner, chunks, shape))


def open_group(url: str, mode: str = "r") -> zarr.Group:
    return zarr.open_group(str(url), mode=mode, zarr_format=3)


def node_metadata(url: str) -> dict[str, Any] | None:
    """The node's own ``zarr.json`` (Zarr v3), parsed; None when there is none at ``url`` or it is
    half-written (a writer mid-write or crashed mid-write; object stores write it whole).

    Reads the one file directly, as the Zarr v3 spec lays it out, instead of through
    ``zarr.open_group``: every step's up-to-date check reads a handful of these per scan, and
    zarr's event-loop round trip per node made them most of an unchanged nightly's cost
    (about 1 ms a node, 18 per scan). Any error other than "not there" propagates."""
    url = str(url).rstrip("/")
    try:
        if "://" not in url or url.startswith("file://"):
            raw = Path(url.removeprefix("file://"), "zarr.json").read_bytes()
        else:
            fs, path = fsspec.core.url_to_fs(url)
            raw = fs.cat_file(f"{path}/zarr.json")
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return meta if isinstance(meta, dict) and meta.get("zarr_format") == 3 else None


def read_record(url: str) -> dict[str, Any] | None:
    """The group's tilewise attributes, or None when there is no group at ``url``.

    None means: the path does not exist, holds no ``zarr.json``, holds an array rather than a
    group, or its ``zarr.json`` is half-written. Each is an incomplete group for every caller. Any
    other error (PermissionError, EIO, s3fs/HTTP errors) propagates: the caller cannot know
    whether the scan is there.
    """
    meta = node_metadata(url)
    if meta is None or meta.get("node_type") != "group":
        return None
    return dict((meta.get("attributes") or {}).get(ATTRS_KEY, {}))


def _promised(record: dict[str, Any]) -> dict[str, list[int] | None]:
    mark = record.get(COMPLETE_KEY)
    arrays = mark.get(ARRAYS_KEY) if isinstance(mark, dict) else None
    if isinstance(arrays, dict):
        return {str(k): (list(v) if v is not None else None) for k, v in arrays.items()}
    # A mark from before marks listed their arrays: it vouches for what its kind always had.
    kind = record.get("kind") or ("prediction" if "digest" in record else "scan")
    return {path: None for path in LEGACY_PROMISES.get(kind, ())}


def is_complete(url: str) -> bool:
    """True when the group has its completion mark and every array the mark lists is there with
    the listed shape (metadata only: one small read per array). Errors other than "not there"
    propagate (see :func:`read_record`)."""
    return complete_record(url) is not None


def complete_record(url: str) -> dict[str, Any] | None:
    """The group's record when it is complete (:func:`is_complete`), else None."""
    record = read_record(url)
    if not (record and record.get(COMPLETE_KEY)):
        return None
    return record if arrays_match(url, _promised(record)) else None


def array_shape(url: str) -> tuple[int, ...] | None:
    """The shape of the array at ``url`` (metadata only), None when there is no array there."""
    meta = node_metadata(url)
    return tuple(meta.get("shape", ())) if meta is not None and meta.get("node_type") == "array" else None


def arrays_match(url: str, arrays: dict[str, list[int] | None]) -> bool:
    """True when every ``path`` in ``arrays`` is an array of the group at ``url`` with that shape
    (None: any shape). Metadata only (:func:`node_metadata`). Errors other than "not there" propagate."""
    url = str(url).rstrip("/")
    group = node_metadata(url)
    if group is None or group.get("node_type") != "group":
        return False
    for path, shape in arrays.items():
        found = array_shape(f"{url}/{path}")
        if found is None or (shape is not None and list(found) != list(shape)):
            return False
    return True


def _own_arrays(group: zarr.Group, prefix: str = "") -> list[str]:
    """Every array under ``group``, skipping sub-groups that carry their own tilewise record (the
    prediction, the NGFF label image): those have their own writer and their own mark."""
    out = []
    for name, node in group.members():
        if isinstance(node, zarr.Array):
            out.append(f"{prefix}{name}")
        elif ATTRS_KEY not in node.attrs:
            out.extend(_own_arrays(node, f"{prefix}{name}/"))
    return sorted(out)


def mark_complete(group: zarr.Group, record: dict[str, Any], arrays: Iterable[str] | None = None) -> None:
    """Write the completion mark, listing the arrays it vouches for with their shapes. Call it last.

    ``arrays``: paths inside the group the writer promises (default: every array of the group,
    skipping sub-groups with their own record). Raises ValueError, writing nothing, if one is
    missing or is not an array: a mark is only ever written on a group whose arrays are there.
    """
    paths = list(arrays) if arrays is not None else _own_arrays(group)
    shapes: dict[str, list[int]] = {}
    for path in paths:
        try:
            node = group[path]
        except KeyError:
            raise ValueError(f"{group.store_path}: not marking complete: array '{path}' is missing") from None
        if not isinstance(node, zarr.Array):
            raise ValueError(f"{group.store_path}: not marking complete: '{path}' is not an array")
        shapes[path] = list(node.shape)
    attrs = dict(group.attrs.get(ATTRS_KEY, {}))
    attrs[COMPLETE_KEY] = {**record, ARRAYS_KEY: shapes}
    group.attrs[ATTRS_KEY] = attrs


def marks(record: dict[str, Any] | None) -> dict[str, Any]:
    """What says which result a record is: its digest and completion mark, and those of every
    part with a mark of its own (the instances). A reader compares them before and after."""
    record = record or {}
    out: dict[str, Any] = {"digest": record.get("digest"), COMPLETE_KEY: record.get(COMPLETE_KEY)}
    for key, value in sorted(record.items()):
        if isinstance(value, dict) and COMPLETE_KEY in value:
            out[key] = {"digest": value.get("digest"), COMPLETE_KEY: value.get(COMPLETE_KEY)}
    return out


def check_marks(url: str, expected: dict[str, Any], doing: str = "read") -> None:
    """ScanError (one line) unless the record at ``url`` still has the marks ``expected`` (taken
    with :func:`marks` before the read): it changed while it was being ``doing``."""
    if marks(read_record(url)) != expected:
        raise ScanError(url, f"changed while it was being {doing} (another run rewrote it); run again")


def _drop_marks(record: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in record.items() if k != COMPLETE_KEY}
    for key, value in out.items():
        if isinstance(value, dict) and COMPLETE_KEY in value:
            out[key] = {k: v for k, v in value.items() if k != COMPLETE_KEY}
    return out


def clear_complete(url: str) -> None:
    """Take the mark away first: deleting a group file by file is not atomic, and a crash in the
    middle must not leave a 'complete' zarr.json above missing arrays."""
    group = open_group(url, mode="r+")
    attrs = dict(group.attrs.get(ATTRS_KEY, {}))
    cleared = _drop_marks(attrs)  # the part marks too (the instances'): none may outlive the group's
    if cleared != attrs:
        group.attrs[ATTRS_KEY] = cleared


def remove(url: str) -> None:
    """Delete the group at ``url`` (nothing if there is none). Writers call it holding the lock.
    The group's marks go first (:func:`clear_complete`): files are deleted one by one, and a
    crash, or a reader that ignores the lock, must never find a mark above missing chunks."""
    fs, path = fsspec.core.url_to_fs(str(url))
    if exists(url):
        record = read_record(url)
        if record and _drop_marks(record) != record:
            clear_complete(url)
        fs.rm(path, recursive=True)


def exists(url: str) -> bool:
    """Is there anything at ``url``? Only "no such file" means no: fsspec's own ``exists`` answers
    False for any error, which would read an outage as "absent"."""
    fs, path = fsspec.core.url_to_fs(str(url))
    try:
        fs.info(path)
    except FileNotFoundError:
        return False
    return True


def looks_like_group(url: str) -> bool:
    """True for a Zarr group (even a half-written one) or an empty folder: safe to replace.
    Anything else at that path is the user's, and tilewise never deletes it."""
    fs, path = fsspec.core.url_to_fs(str(url))
    if not fs.exists(path):
        return True
    if not fs.isdir(path):
        return False
    return fs.exists(f"{path}/zarr.json") or not fs.ls(path)


def stored_chunks(url: str) -> "np.ndarray":
    """A boolean map of the chunk grid of the array at ``url``, True where a chunk is stored: one
    listing of its folder, no chunk read. Reading the 65,536 one-byte chunks of a 16 GiB stack's done
    marks took 13 s and 49 MB here; zarr's own listing of a local store (``rglob`` and a ``stat`` per
    file) 6 s; ``os.walk`` 0.6 s. A chunk never written, or written as the fill value, is False."""
    import os

    import numpy as np

    array = zarr.open_array(str(url), mode="r")
    if array.metadata.zarr_format == 3:
        encoding = array.metadata.chunk_key_encoding
        head, sep = ("c" + encoding.separator if encoding.name == "default" else ""), encoding.separator
    else:
        head, sep = "", array.metadata.dimension_separator or "."
    grid = tuple(-(-n // c) for n, c in zip(array.shape, array.chunks))
    flags = np.zeros(grid, dtype=bool)
    fs, root = fsspec.core.url_to_fs(str(url))
    root = root.rstrip("/")
    if fs.protocol in ("file", "local") or "file" in fs.protocol:
        names = (os.path.relpath(os.path.join(folder, f), root).replace(os.sep, "/")
                 for folder, _, files in os.walk(root) for f in files)
    else:
        names = (p[len(root) + 1:] for p in fs.find(root))
    for name in names:
        if not name.startswith(head):
            continue
        try:
            index = tuple(int(i) for i in name[len(head):].split(sep))
        except ValueError:
            continue  # metadata (zarr.json, .zarray ...)
        if len(index) == len(grid) and all(0 <= i < g for i, g in zip(index, grid)):
            flags[index] = True
    return flags


def read_chunk_bytes(array: zarr.Array, coords: tuple[int, ...]):
    """The stored (encoded) bytes of one chunk of ``array`` (a zarr Buffer), None when it is not stored."""
    key = array.store_path / array.metadata.encode_chunk_key(coords)
    return key.get_sync() if _sync_bytes(array.store) else _zarr_sync(key.get())


def write_chunk_bytes(array: zarr.Array, coords: tuple[int, ...], data) -> None:
    """Store ``data`` (a chunk's encoded bytes, from :func:`read_chunk_bytes`) as chunk ``coords``."""
    key = array.store_path / array.metadata.encode_chunk_key(coords)
    if _sync_bytes(array.store):
        key.set_sync(data)
    else:
        _zarr_sync(key.set(data))


def local_bytes(array: zarr.Array) -> bool:
    """The array's stored bytes are a local read away (a folder), not a network round trip (S3 ...)."""
    return _sync_bytes(array.store)


def _sync_bytes(store) -> bool:
    """Local stores read and write bytes without zarr's event loop; fsspec's (S3 ...) only through it."""
    from zarr.abc.store import SupportsGetSync, SupportsSetSync

    return isinstance(store, SupportsGetSync) and isinstance(store, SupportsSetSync)


def _zarr_sync(coroutine):
    from zarr.core.sync import sync

    return sync(coroutine)

"""Scan groups in Zarr: opening, the completion mark, removal.

Storage contract (README "Zarr layout"): one Zarr v3 group per scan. A group is complete only when
its ``tilewise.complete`` attribute is present; it is written last, after every array and every
other attribute. Readers must ignore incomplete groups, and writers replace them.
"""

from __future__ import annotations

from typing import Any

import fsspec
import zarr

COMPLETE_KEY = "complete"
ATTRS_KEY = "tilewise"


def open_group(url: str, mode: str = "r") -> zarr.Group:
    return zarr.open_group(str(url), mode=mode, zarr_format=3)


def read_record(url: str) -> dict[str, Any] | None:
    """The group's tilewise attributes, or None if there is no readable group at ``url``."""
    try:
        group = open_group(url, mode="r")
    except Exception:  # missing, or a half-written zarr.json from a crash
        return None
    return dict(group.attrs.get(ATTRS_KEY, {}))


def is_complete(url: str) -> bool:
    record = read_record(url)
    return bool(record and record.get(COMPLETE_KEY))


def mark_complete(group: zarr.Group, record: dict[str, Any]) -> None:
    """Write the completion mark. Call it last."""
    attrs = dict(group.attrs.get(ATTRS_KEY, {}))
    attrs[COMPLETE_KEY] = record
    group.attrs[ATTRS_KEY] = attrs


def clear_complete(url: str) -> None:
    """Take the mark away first: deleting a group file by file is not atomic, and a crash in the
    middle must not leave a 'complete' zarr.json above missing arrays."""
    group = open_group(url, mode="r+")
    attrs = dict(group.attrs.get(ATTRS_KEY, {}))
    if attrs.pop(COMPLETE_KEY, None) is not None:
        group.attrs[ATTRS_KEY] = attrs


def remove(url: str) -> None:
    fs, path = fsspec.core.url_to_fs(str(url))
    if fs.exists(path):
        fs.rm(path, recursive=True)


def exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(str(url))
    return fs.exists(path)


def looks_like_group(url: str) -> bool:
    """True for a Zarr group (even a half-written one) or an empty folder: safe to replace.
    Anything else at that path is the user's, and tilewise never deletes it."""
    fs, path = fsspec.core.url_to_fs(str(url))
    if not fs.exists(path):
        return True
    if not fs.isdir(path):
        return False
    return fs.exists(f"{path}/zarr.json") or not fs.ls(path)

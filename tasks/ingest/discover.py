"""Turn a catalog entry into the list of scans it currently names.

A scan is described by a :class:`ScanSpec`: its id, modality, source files and, when the catalog
has them, its label files. Globs and fsspec URLs are resolved here; everything after this works on
local paths (remote files are fetched into a local cache first, see :func:`localize`).
"""

from __future__ import annotations

import glob as _glob
import os
from dataclasses import dataclass
from pathlib import Path

import fsspec

from data_catalog import LoadedEntry
from tasks.errors import ScanError

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class LabelSpec:
    sources: tuple[Path, ...]
    mapping: dict[int, int]
    classes: tuple[str, ...]


@dataclass(frozen=True)
class ScanSpec:
    """One scan to ingest. ``sources`` are channel files, one stack file or one slice folder."""

    scan_id: str
    modality: str
    sources: tuple[Path, ...]
    dataset: str | None = None
    reader_kind: str | None = None
    channel_names: tuple[str, ...] | None = None
    spacing: tuple[float, ...] | None = None
    unit: str | None = None
    chunks: tuple[int, ...] | None = None
    labels: LabelSpec | None = None


def strip_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in NIFTI_SUFFIXES + (".tiff", ".tif", ".png"):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_url(path: str) -> bool:
    return "://" in path


def localize(url: str, cache_dir: Path | None = None) -> Path:
    """A local path for ``url``: itself when local, else a copy in the fsspec simplecache."""
    fs, path = fsspec.core.url_to_fs(url)
    if "file" in fs.protocol or "local" in fs.protocol:
        return Path(path)
    from tasks.settings import tilewise_home

    cache = cache_dir or tilewise_home() / "cache"
    return Path(fsspec.open_local(f"simplecache::{url}", simplecache={"cache_storage": str(cache)}))


def _matches(pattern: str) -> list[str]:
    if _is_url(pattern):
        fs, path = fsspec.core.url_to_fs(pattern)
        found = fs.glob(path) if _glob.has_magic(path) else ([path] if fs.exists(path) else [])
        proto = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
        return sorted(p if "://" in p else f"{proto}://{p}" for p in found)
    if _glob.has_magic(pattern):
        return sorted(_glob.glob(pattern))
    return [pattern] if os.path.exists(pattern) else []


def discover_scans(loaded: LoadedEntry) -> list[ScanSpec]:
    """Every scan the entry's ``scans.path`` matches now, sorted by scan id."""
    entry, base = loaded.entry, loaded.base_dir
    pattern = entry.scans.path
    if not _is_url(pattern) and not os.path.isabs(pattern):
        pattern = str(base / pattern)
    specs: dict[str, ScanSpec] = {}
    for match in _matches(pattern):
        local = localize(match) if _is_url(match) else Path(match)
        if entry.scans.channels:
            if not local.is_dir():
                continue  # channel files live in one folder per scan
            sources = tuple(local / name for name in entry.scans.channels)
        else:
            sources = (local,)
        fields = {"stem": strip_suffix(local.name), "name": local.name, "parent": local.parent.name}
        scan_id = entry.scans.id.format(**fields)
        if scan_id in specs:
            raise ScanError(local, f"scan id '{scan_id}' is also given to {specs[scan_id].sources[0]}; "
                                   "set scans.id in the catalog entry")
        labels = None
        if entry.labels is not None:
            label_path = entry.labels.path.format(scan=str(local), dir=str(local.parent), **{
                k: fields[k] for k in ("name", "stem")})
            label = Path(label_path) if os.path.isabs(label_path) else base / label_path
            labels = LabelSpec(
                sources=(Path(os.path.normpath(label)),),
                mapping=dict(entry.labels.mapping),
                classes=tuple(entry.labels.classes),
            )
        specs[scan_id] = ScanSpec(
            scan_id=scan_id,
            modality=entry.modality,
            sources=sources,
            dataset=entry.name,
            reader_kind=entry.reader.kind,
            channel_names=tuple(entry.scans.channels and [strip_suffix(c) for c in entry.scans.channels]
                                or entry.reader.band_names or ()) or None,
            spacing=tuple(entry.reader.spacing) if entry.reader.spacing else None,
            unit=entry.reader.unit,
            chunks=tuple(entry.chunks) if entry.chunks else None,
            labels=labels,
        )
    return [specs[k] for k in sorted(specs)]

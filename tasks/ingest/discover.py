"""Turn a catalog entry into the list of scans it currently names.

A scan is described by a :class:`ScanSpec`: its id, modality, source files and, when the catalog
has them, its label files. Globs and fsspec URLs are resolved here. A remote match (an fsspec URL)
is described by its listing only: its ``sources`` are URLs and ``remote`` holds each object's size,
ETag and mtime; nothing is downloaded until ingest needs the bytes (see :mod:`tasks.ingest.remote`).
"""

from __future__ import annotations

import glob as _glob
import os
from dataclasses import dataclass
from pathlib import Path

from data_catalog import LoadedEntry
from tasks.errors import ScanError
from tasks.ingest.remote import RemoteScan, describe_object, is_url, list_matches, local_path

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class LabelSpec:
    sources: tuple[Path | str, ...]  # local paths, or URLs when ``remote`` is set
    mapping: dict[int, int]
    classes: tuple[str, ...]
    remote: RemoteScan | None = None


@dataclass(frozen=True)
class ScanSpec:
    """One scan to ingest. ``sources`` are channel files, one stack file or one slice folder:
    local paths, or URLs for a remote scan, whose objects and their metadata are in ``remote``."""

    scan_id: str
    modality: str
    sources: tuple[Path | str, ...]
    dataset: str | None = None
    reader_kind: str | None = None
    channel_names: tuple[str, ...] | None = None
    spacing: tuple[float, ...] | None = None
    unit: str | None = None
    chunks: tuple[int, ...] | None = None
    labels: LabelSpec | None = None
    remote: RemoteScan | None = None


def strip_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in NIFTI_SUFFIXES + (".tiff", ".tif", ".png"):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _matches(pattern: str) -> list[str]:
    if _glob.has_magic(pattern):
        return sorted(_glob.glob(pattern))
    return [pattern] if os.path.exists(pattern) else []


def _local_matches(pattern: str, channels: list[str] | None) -> list[tuple[Path, tuple[Path, ...]]]:
    out = []
    for match in _matches(pattern):
        local = Path(match)
        if channels:
            if not local.is_dir():
                continue  # channel files live in one folder per scan
            out.append((local, tuple(local / name for name in channels)))
        else:
            out.append((local, (local,)))
    return out


def _label_spec(loaded: LoadedEntry, scan: str, parent: str, fields: dict[str, str], listed: bool) -> LabelSpec:
    """The scan's labels; a URL is described by its listing (``listed``: this discovery has just
    listed the storage afresh, so its cached listings may be used)."""
    entry, base = loaded.entry, loaded.base_dir
    label_path = entry.labels.path.format(scan=scan, dir=parent, **{k: fields[k] for k in ("name", "stem")})
    label_path = local_path(label_path) or label_path
    common = {"mapping": dict(entry.labels.mapping), "classes": tuple(entry.labels.classes)}
    if is_url(label_path):
        remote = describe_object(label_path, fresh=not listed)
        return LabelSpec(sources=remote.source_urls(), remote=remote, **common)
    label = Path(label_path) if os.path.isabs(label_path) else base / label_path
    return LabelSpec(sources=(Path(os.path.normpath(label)),), **common)


def discover_scans(loaded: LoadedEntry) -> list[ScanSpec]:
    """Every scan the entry's ``scans.path`` matches now, sorted by scan id.

    Remote matches are listed, never downloaded (``tilewise catalog list`` reads no object body).
    """
    entry, base = loaded.entry, loaded.base_dir
    pattern = local_path(entry.scans.path) or entry.scans.path
    if not is_url(pattern) and not os.path.isabs(pattern):
        pattern = str(base / pattern)
    if is_url(pattern):
        matches = [(scan.url, scan.source_urls(), scan) for scan in list_matches(pattern, entry.scans.channels)]
    else:
        matches = [(str(local), sources, None) for local, sources in _local_matches(pattern, entry.scans.channels)]
    specs: dict[str, ScanSpec] = {}
    for match, sources, remote in matches:
        if remote:  # URLs are split on "/" (Path would fold the "//" of "s3://")
            parent, _, name = match.rstrip("/").rpartition("/")
            parent_name = parent.rpartition("/")[2]
        else:
            name, parent, parent_name = Path(match).name, str(Path(match).parent), Path(match).parent.name
        fields = {"stem": strip_suffix(name), "name": name, "parent": parent_name}
        scan_id = entry.scans.id.format(**fields)
        if scan_id in specs:
            raise ScanError(match, f"scan id '{scan_id}' is also given to {specs[scan_id].sources[0]}; "
                                   "set scans.id in the catalog entry")
        labels = _label_spec(loaded, match, parent, fields, remote is not None) if entry.labels is not None else None
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
            remote=remote,
        )
    return [specs[k] for k in sorted(specs)]

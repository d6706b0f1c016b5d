"""Provenance of an export, atomic output files, and the "unchanged" decision.

Every export file ``OUT`` is written under a temporary name in OUT's own folder and renamed onto
OUT only when complete (``os.replace`` is atomic on one file system), so a crash leaves at most a
``.OUT.tmp-*`` file, never a half-written OUT. Beside it, ``OUT.tilewise.json`` (the sidecar)
records where it came from: the store and its digest, the prediction's digest, model, calibrator,
the format and its options, the time. The old sidecar is deleted before a new export starts and the
new one written after the rename, so a sidecar always describes the file beside it.

Re-exporting is a no-op when OUT exists, its size is the one the sidecar recorded, and the
sidecar's identity (store digest, prediction digest, format, options) equals the new one.
"""

from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from tasks import identity as step_identity
from tasks.errors import ScanError
from tasks.export.source import ExportSource
from tasks.version import tilewise_version

SIDECAR_SUFFIX = ".tilewise.json"
IDENTITY_KEYS = ("store", "store_digest", "prediction_digest", "format", "options")


def sidecar_path(out: Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + SIDECAR_SUFFIX)


def provenance(src: ExportSource, fmt: str, options: dict[str, Any]) -> dict[str, Any]:
    """What the sidecar (and the format's own metadata, where it has room) records."""
    return {
        "kind": "tilewise-export",
        "store": src.url,
        "store_digest": src.store_digest(),
        "scan_id": src.record.get("scan_id"),
        "dataset": src.record.get("dataset"),
        "prediction_digest": src.prediction_digest(),
        "model": src.prediction.get("model"),
        "calibrator": src.prediction.get("calibrator"),
        "classes": src.classes,
        "format": fmt,
        "options": options,
        "tilewise_version": tilewise_version(), **step_identity.stamp("export"),
        "exported_at": datetime.now(timezone.utc).isoformat(),
    }


def identity(record: dict[str, Any]) -> dict[str, Any]:
    return {k: record.get(k) for k in IDENTITY_KEYS}


def read_sidecar(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads(sidecar_path(out).read_text())
    except (OSError, ValueError):
        return None


def up_to_date(out: Path, record: dict[str, Any]) -> bool:
    """True when ``out`` is the complete export that ``record`` would produce again."""
    out = Path(out)
    old = read_sidecar(out)
    if old is None or not out.is_file():
        return False
    return (identity(old) == identity(record) and not step_identity.outdated("export", old)
            and old.get("output", {}).get("size") == out.stat().st_size)


def write_sidecar(out: Path, record: dict[str, Any]) -> Path:
    out = Path(out)
    record = {**record, "output": {"path": out.name, "size": out.stat().st_size}}
    path = sidecar_path(out)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    return path


def check_target(out: Path) -> Path:
    """``out`` as a Path whose folder exists; refuses folders (an export is one file)."""
    out = Path(out)
    if out.is_dir():
        raise ScanError(out, "is a folder; --out names the file to write")
    if not out.parent.exists():
        raise ScanError(out.parent, "folder does not exist")
    return out


@contextmanager
def atomic_output(out: Path) -> Iterator[Path]:
    """A temporary path beside ``out``; renamed onto ``out`` when the block ends without error,
    deleted when it raises. The stale sidecar is removed first."""
    out = check_target(out)
    sidecar_path(out).unlink(missing_ok=True)
    # Keep the real suffix last: GDAL and nibabel choose the format (and gzip) from the name.
    tmp = out.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{out.name}")
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()

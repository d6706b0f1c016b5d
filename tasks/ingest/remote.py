"""Scans on object storage (or any fsspec URL): list them by metadata, fetch them only to ingest.

Discovery lists a remote match and records, per object, its URL, size, ETag and modification
time as the listing gives them: no object body is read. Ingest compares that metadata with what
the scan group recorded at the last ingest (the ETag when there is one, else size and mtime) and
fetches the objects only when the scan must be (re)ingested.

A fetched scan lives in ``<cache>/remote/<url key>-<metadata key>/``: the key changes whenever any
object's metadata changes, so a changed object never reuses a stale copy. Objects are downloaded
into a private ``.part-*`` folder that is renamed into place only when every object arrived whole;
a half-downloaded folder is never taken as done. The copies of older versions of the scan are
removed once the new one is in place.

The copy is deleted once the scan is ingested (:func:`release`). Chosen over a bounded cache
because, once ingested, a remote scan is never read again: an unchanged scan is told "unchanged"
from its listing alone, and a changed one must be fetched anew anyway; only ``--force`` or new
ingest options re-read the same bytes, and those are rare next to holding every scan's full size
on disk for ever. A failed ingest keeps its copy, so the flow's retry (or tomorrow's run) does not
download it again; the next successful ingest of that scan, or a new version of it, removes it.
While an ingest uses a copy it holds a shared lock on ``<copy>.lock`` (taken in :func:`fetch`), and
a copy is only deleted under an exclusive lock taken without waiting: a copy another ingest is
reading is left to that ingest.

Remote "folders" are prefixes: a match that lists as a directory is a folder of slices, or, with
the catalog's ``scans.channels``, a folder holding one object per channel. Only the objects
directly under the prefix belong to it (names starting with "." are skipped, as for local folders).

Transient errors (connection reset or refused, 5xx, throttling) are retried by botocore itself
("standard" mode: jittered exponential backoff, each wait at most 20 s, :data:`S3_ATTEMPTS` tries
in all, or ``AWS_MAX_ATTEMPTS`` / ``AWS_RETRY_MODE`` when set) and s3fs's own loop for throttling
answers and broken reads. A download still failing then is :class:`RemoteUnavailable`, a
ConnectionError the flows retry the task on; 403, 404 and bad data are a ScanError at once. A
listing that fails is a ScanError either way (it fails that dataset only, never the whole run).
"""

from __future__ import annotations

import datetime as _dt
import glob as _glob
import hashlib
import json
import os
import posixpath
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from models.transient import is_transient
from tasks.errors import ScanError

# botocore retries what may pass (connection errors, 5xx, throttling) with jittered exponential
# backoff, each wait at most 20 s ("standard" mode): these attempts bound it (about 2 minutes at
# worst). AWS_MAX_ATTEMPTS / AWS_RETRY_MODE, botocore's own variables, still choose when set.
S3_ATTEMPTS = 8


class RemoteUnavailable(ConnectionError):
    """The storage did not answer (reset, 5xx, throttling) after botocore's bounded retries. A
    ConnectionError, not a ScanError: the flows retry the scan's task and the CLI says it in one
    line; "no right", "not there" and bad data stay ScanErrors, said at once."""


def retry_attempts() -> int:
    try:
        return max(1, int(os.environ.get("AWS_MAX_ATTEMPTS") or S3_ATTEMPTS))
    except ValueError:
        return S3_ATTEMPTS


def _tries() -> str:
    n = retry_attempts()
    return f"{n} {'try' if n == 1 else 'tries'}"


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for ``url``: botocore's retry settings for S3 (see :data:`S3_ATTEMPTS`)."""
    if url.partition("://")[0] not in ("s3", "s3a"):
        return {}
    mode = os.environ.get("AWS_RETRY_MODE") or "standard"
    return {"config_kwargs": {"retries": {"mode": mode, "total_max_attempts": retry_attempts()}}}


def filesystem(url: str):
    """(filesystem, path) of ``url`` with :func:`storage_options`."""
    return fsspec.core.url_to_fs(url, **storage_options(url))


def is_url(path: str | os.PathLike) -> bool:
    """A remote location: an fsspec URL other than ``file://`` (see :func:`local_path`)."""
    return "://" in str(path) and local_path(str(path)) is None


def local_path(url: str) -> str | None:
    """The path of a ``file://`` or ``local://`` URL (read in place, never copied), else None."""
    protocol, _, path = url.partition("://")
    return path if path and protocol in ("file", "local") else None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if type(exc).__name__ not in text else text


@dataclass(frozen=True)
class RemoteObject:
    """One object as its listing describes it. ``size`` None: the object is not there."""

    url: str
    size: int | None
    etag: str | None = None
    mtime: str | None = None

    def record(self) -> dict[str, Any]:
        """Its entry in the scan group's ``source.files`` (what the next ingest compares)."""
        return {"path": self.url, "size": self.size, "etag": self.etag, "mtime": self.mtime}

    def modified(self) -> _dt.datetime | None:
        """``mtime`` as an aware datetime (ISO text, naive read as UTC, or epoch seconds), else None."""
        if not self.mtime:
            return None
        try:
            when = _dt.datetime.fromtimestamp(float(self.mtime), tz=_dt.timezone.utc)
        except (ValueError, OverflowError, OSError):
            try:
                when = _dt.datetime.fromisoformat(self.mtime)
            except ValueError:
                return None
        return when if when.tzinfo else when.replace(tzinfo=_dt.timezone.utc)


@dataclass(frozen=True)
class RemoteScan:
    """What one remote match is made of.

    ``url`` is the match (an object or a prefix); ``objects`` every object ingest reads;
    ``sources`` the reader's sources relative to the folder the match is fetched into (the
    object's name, the prefix's name for a slice folder, ``prefix/channel`` for channel files).
    """

    url: str
    objects: tuple[RemoteObject, ...]
    sources: tuple[str, ...]

    def parent(self) -> str:
        return self.url.rstrip("/").rpartition("/")[0]

    def source_urls(self) -> tuple[str, ...]:
        return tuple(f"{self.parent()}/{s}" for s in self.sources)

    def newest_mtime(self) -> _dt.datetime | None:
        """The latest modification time of its objects as listed (None when no listing gives one).
        A prefix has no time of its own: a slice or channel folder is as new as its newest object."""
        times = [t for t in (o.modified() for o in self.objects) if t is not None]
        return max(times, default=None)

    def key(self) -> str:
        """Names the fetched copy: the match, then every object's metadata."""
        url_key = hashlib.sha256(self.url.encode()).hexdigest()[:16]
        meta = json.dumps([o.record() for o in self.objects], sort_keys=True)
        return f"{url_key}-{hashlib.sha256(meta.encode()).hexdigest()[:16]}"


def _object(fs, path: str, info: dict[str, Any]) -> RemoteObject:
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    mtime = None
    for name in ("LastModified", "last_modified", "mtime", "updated", "modified", "created"):
        if info.get(name) is not None:
            value = info[name]
            mtime = value.isoformat() if hasattr(value, "isoformat") else str(value)
            break
    size = info.get("size", info.get("Size"))
    return RemoteObject(fs.unstrip_protocol(path), None if size is None else int(size),
                        None if etag is None else str(etag).strip('"'), mtime)


def _files_under(fs, prefix: str) -> dict[str, dict[str, Any]]:
    """The objects directly under ``prefix``, by name (no sub-prefixes, no hidden names)."""
    return {info["name"].rstrip("/").rsplit("/", 1)[-1]: info
            for info in fs.ls(prefix, detail=True)
            if info.get("type") != "directory" and not info["name"].rstrip("/").rsplit("/", 1)[-1].startswith(".")}


def _channel(fs, prefix: str, channel: str, children: dict[str, dict[str, Any]]) -> RemoteObject:
    """A channel object of a scan prefix: from the prefix's listing, or (a channel in a deeper
    prefix, ``sub/name``) its own HEAD; ``size`` None when it is not there."""
    path = f"{prefix}/{channel}"
    if channel in children:
        return _object(fs, path, children[channel])
    if "/" in channel:
        try:
            return _object(fs, path, fs.info(path))
        except FileNotFoundError:
            pass
    return RemoteObject(fs.unstrip_protocol(path), None)


def list_matches(pattern: str, channels: list[str] | None = None, fresh: bool = True) -> list[RemoteScan]:
    """Every match of ``pattern`` (an fsspec URL, may hold a glob), described from listings only.

    One listing for the pattern and one per matched prefix; no object body is read. ``fresh``
    drops the filesystem's cached listings first (False: reuse what this discovery listed). A listed
    channel that is not under its prefix is kept with ``size`` None (ingest names it missing).
    Raises :class:`ScanError` naming the URL when the storage cannot be listed.
    """
    try:
        fs, path = filesystem(pattern)
        if fresh:
            fs.invalidate_cache()  # a long-lived filesystem caches listings: list afresh
        if _glob.has_magic(path):
            found = fs.glob(path, detail=True)
        else:
            try:
                found = {path: fs.info(path)}
            except FileNotFoundError:
                found = {}
        scans = []
        for name, info in sorted(found.items()):
            name = name.rstrip("/")
            base = name.rsplit("/", 1)[-1]
            if info.get("type") == "directory":
                children = _files_under(fs, name)
                if channels:
                    objects = tuple(_channel(fs, name, c, children) for c in channels)
                    sources = tuple(f"{base}/{c}" for c in channels)
                else:
                    objects = tuple(_object(fs, f"{name}/{n}", children[n]) for n in sorted(children))
                    sources = (base,)
            elif channels:
                continue  # channel files live in one folder (prefix) per scan
            else:
                objects, sources = (_object(fs, name, info),), (base,)
            scans.append(RemoteScan(fs.unstrip_protocol(name), objects, sources))
        return scans
    except ScanError:
        raise
    except Exception as exc:  # unreachable endpoint, no credentials, no such bucket...
        # a ScanError even when transient (botocore retried it already): discovery failing fails
        # only this dataset tonight, never the whole run
        retried = f" after {_tries()}" if is_transient(exc) else ""
        raise ScanError(pattern, f"cannot list the remote scans{retried} ({_one_line(exc)})") from None


def describe_object(url: str, fresh: bool = False) -> RemoteScan:
    """One remote object or prefix (a label file or label slice folder), from its listing (the
    listing this discovery made, unless ``fresh``). Not there: one object with ``size`` None
    (ingest names it missing). ``.`` and ``..`` in the URL are resolved as in a local path."""
    url = _normalized(url)
    found = list_matches(url, fresh=fresh)
    if found:
        return found[0]
    return RemoteScan(url, (RemoteObject(url, None),), (url.rstrip("/").rpartition("/")[2],))


def _normalized(url: str) -> str:
    protocol, _, path = url.partition("://")
    return f"{protocol}://{posixpath.normpath(path)}"


def describe_sources(urls: list[str]) -> RemoteScan:
    """One scan named by URL(s) (``tilewise ingest --source``), described as discovery describes a
    remote match, from a fresh listing: one URL is an object or a prefix (a folder of slices);
    several are channel objects directly under one prefix, stacked in the given order. A missing
    object has ``size`` None. Raises :class:`ScanError` for a pattern (one scan, not a glob),
    channels under different prefixes, or storage that cannot be listed.
    """
    urls = [_normalized(u) for u in urls]
    for url in urls:
        if _glob.has_magic(url.partition("://")[2]):
            raise ScanError(url, "is a pattern; ingest takes one scan (a catalog entry takes patterns)")
    if len(urls) == 1:
        return describe_object(urls[0], fresh=True)
    prefix = urls[0].rpartition("/")[0]
    for url in urls:
        if url.rpartition("/")[0] != prefix:
            raise ScanError(url, f"is not directly under {prefix}/ (the channel objects of one scan share a prefix)")
    names = [url.rpartition("/")[2] for url in urls]
    if len(set(names)) != len(names):
        raise ScanError(prefix, "the same channel object is given twice")
    found = list_matches(prefix, channels=names)
    if found:
        return found[0]
    base = prefix.rpartition("/")[2]  # no such prefix: every channel is missing
    return RemoteScan(prefix, tuple(RemoteObject(u, None) for u in urls), tuple(f"{base}/{n}" for n in names))


_holds: dict[str, list[int]] = {}  # copy folder -> open lock files holding its shared lock


def _lock_path(copy: Path) -> Path:
    return copy.with_name(copy.name + ".lock")


def _hold(copy: Path) -> None:
    import fcntl

    fd = os.open(_lock_path(copy), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)
    _holds.setdefault(str(copy), []).append(fd)


def _delete_unused(copy: Path) -> bool:
    """Delete ``copy`` unless another ingest holds it (its shared lock); True when deleted."""
    import fcntl

    lock = _lock_path(copy)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    try:
        shutil.rmtree(copy, ignore_errors=True)
        lock.unlink(missing_ok=True)
    finally:
        os.close(fd)
    return not copy.exists()


def release(*scans: "RemoteScan | None", ingested: bool, cache_dir: Path | None = None) -> None:
    """The end of an ingest that fetched ``scans``: drop this ingest's hold on each copy and, when
    ``ingested``, delete the copy (unless another ingest holds it). See the module docstring."""
    root = _cache_root(cache_dir)
    for scan in scans:
        if scan is None:
            continue
        copy = root / scan.key()
        fds = _holds.get(str(copy))
        if fds:
            os.close(fds.pop())
            if not fds:
                del _holds[str(copy)]
        if ingested and copy.is_dir():
            _delete_unused(copy)


def _cache_root(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    from tasks.settings import tilewise_home

    return tilewise_home() / "cache" / "remote"


def fetch(scan: RemoteScan, cache_dir: Path | None = None) -> tuple[tuple[Path, ...], dict[str, Path]]:
    """Download the scan's objects (once per version) and return the local sources for the
    reader and each object's local copy by URL.

    Raises :class:`ScanError` naming the URL when an object is missing, cannot be read, or
    changed size while it was being downloaded.
    """
    for obj in scan.objects:
        if obj.size is None:
            raise ScanError(obj.url, "does not exist")
    root = _cache_root(cache_dir)
    final = root / scan.key()
    parent = scan.parent()
    local = {o.url: final / o.url[len(parent) + 1:] for o in scan.objects}
    if not final.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        part = root / f".part-{scan.key()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            for source in scan.sources:  # a slice folder exists even when its prefix is empty
                if not any(o.url[len(parent) + 1:] == source for o in scan.objects):
                    (part / source).mkdir(parents=True, exist_ok=True)
            for obj in scan.objects:
                target = part / obj.url[len(parent) + 1:]
                target.parent.mkdir(parents=True, exist_ok=True)
                _download(obj, target)
            try:
                os.rename(part, final)
            except OSError:
                if not final.is_dir():  # else another run put the same version in place first
                    raise
        finally:
            shutil.rmtree(part, ignore_errors=True)
        _drop_older_versions(root, final)
    _hold(final)  # until release(): no other ingest deletes the copy while this one reads it
    if not final.is_dir():  # deleted by another ingest's release between the check and the hold
        release(scan, ingested=False, cache_dir=cache_dir)
        return fetch(scan, cache_dir)
    return tuple(final / s for s in scan.sources), local


def _download(obj: RemoteObject, target: Path) -> None:
    try:
        fs, path = filesystem(obj.url)
        fs.get_file(path, str(target))
    except FileNotFoundError:
        raise ScanError(obj.url, "does not exist") from None
    except Exception as exc:
        if is_transient(exc):
            raise RemoteUnavailable(f"{obj.url}: the storage did not answer after {_tries()} "
                                    f"({_one_line(exc)}); try again later") from None
        raise ScanError(obj.url, f"cannot be read ({_one_line(exc)})") from None
    got = target.stat().st_size
    if got != obj.size:
        raise ScanError(obj.url, f"changed while it was being read ({got} bytes fetched, {obj.size} listed); "
                                 "run again")


def _drop_older_versions(root: Path, keep: Path) -> None:
    url_key = keep.name.split("-", 1)[0]
    for other in root.glob(f"{url_key}-*"):
        if other != keep and other.is_dir():
            _delete_unused(other)

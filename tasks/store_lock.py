"""One writer, or many readers, per scan group: a lock beside the store.

Every step that writes a scan group (ingest, infer, the CRF, instances, NGFF label images, the
evaluation's record) holds the lock exclusively; every step that reads a prediction (export,
evaluate, the instances' MLflow run) holds it shared (``store_lock(..., shared=True)``): readers run
together, a writer never runs beside a reader. So an export never reads chunks an ``infer --force``
is rewriting, and a re-infer never deletes a prediction an export is reading. Readers still check
that the completion marks they record are the ones they read (tasks/storage.py, ``marks``).

A run that finds the store busy waits up to ``wait`` seconds (``TILEWISE_LOCK_WAIT``, default 0:
fail at once) and then fails with one line naming the holder::

    /data/SCAN.zarr: another tilewise run (pid 4242 on node7, ingest since 2026-05-01T02:00:03+00:00)
    holds the lock /data/SCAN.zarr.lock; ...

Brief writes (``brief=True``: an attribute or record written after a read, the NGFF label image of
an export) are what steps of one nightly run do to a store at the same time as each other (the
evaluation's record while the instance polygons are exported). They must not fail one another:
a brief writer waits for readers, and anyone waits for a brief writer, up to
``TILEWISE_LOCK_BRIEF_WAIT`` seconds (default 600) or ``wait`` if longer. A long writer (infer,
ingest) gets only ``wait``: ``tilewise export`` during ``infer --force`` says "busy" at once.

It never removes or rewrites anything the holder wrote.

- Local stores (and any POSIX mount): ``<store>.lock``, locked with ``fcntl.flock`` (LOCK_EX for a
  writer, LOCK_SH for a reader) and holding one JSON line per holder (pid, host, purpose, mode,
  start time; for the message only: a writer truncates it, readers append). The kernel drops a
  flock when its process dies, kill -9 included, so a lock file left by a dead run never blocks:
  the next run takes it at once. The writer, or the last reader out (it can turn its lock
  exclusive), deletes the file on release; a waiter that locked a file just deleted notices
  (inode changed) and retries. Over NFS, Linux maps flock to NFS byte-range locks (NFSv4, or v3
  with lockd); a FUSE mount without lock support fails with the OS error.
- Object storage (any other fsspec protocol): the writer's marker object ``<store>.lock`` created
  with ``pipe_file(mode="create")``: an atomic create-if-absent on S3 (``If-None-Match: *``; AWS S3
  and MinIO since 2024-11), on other backends fsspec's exists-then-write, which leaves a short
  race. Each reader puts its own marker ``<store>.lock.readers/<token>``. Each side creates its
  own marker first and then looks for the other's: a reader that finds the writer's marker, or a
  writer that finds a reader's, removes its own and backs off. With S3's strong read-after-write
  and list-after-write consistency the later of the two always sees the earlier, so a reader and
  a writer never both hold the store (both may back off at once: then both wait, or fail when
  ``wait`` is 0). A marker whose holder ran on this host and is dead (no such pid) is stale and
  removed (a writer's under a host-local flock, so two local waiters never both replace it). A
  marker from another host is never removed automatically: the message says so, and ``rm`` of
  the marker is the manual fix.
- One distributed infer is one run: the driver holds the lock for the whole run; its Dask workers
  write only their own output chunks and take no lock (tasks/engine/distributed.py).
- Re-entrant within one thread (a run that already holds the lock may call code that takes it; a
  writer may take it shared); another thread of the same process is another run and waits like
  another process. A reader cannot turn into a writer: release first, take it again, and check
  the marks (tasks/metrics/evaluate.py does).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import random
import socket
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Iterator

import fsspec

from tasks.errors import ScanError

log = logging.getLogger(__name__)

WAIT_ENV = "TILEWISE_LOCK_WAIT"
BRIEF_WAIT_ENV = "TILEWISE_LOCK_BRIEF_WAIT"
BRIEF_WAIT_DEFAULT = 600.0
POLL_SECONDS = 0.25
HOLDERS_MAX_BYTES = 64 << 10  # readers stop adding their line to a local lock file beyond this
_held: dict[tuple[str, int], tuple[int, bool]] = {}  # (lock key, thread id) -> (depth, shared)
_held_guard = threading.Lock()


class StoreBusy(ScanError):
    """Another tilewise run holds the store's lock (transient: the same command later will work)."""


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return max(0.0, float(raw))
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {raw!r}") from None


def default_wait() -> float:
    """Seconds a run waits for a busy store: ``$TILEWISE_LOCK_WAIT``, default 0 (fail at once)."""
    return _seconds(WAIT_ENV, 0.0)


def brief_wait() -> float:
    """Seconds a brief write waits for readers, and anyone for a brief write:
    ``$TILEWISE_LOCK_BRIEF_WAIT``, default 600."""
    return _seconds(BRIEF_WAIT_ENV, BRIEF_WAIT_DEFAULT)


def lock_path(url: str) -> str:
    """The lock's location, beside the store: ``<store>.lock`` (as a URL when the store is one)."""
    return f"{str(url).rstrip('/')}.lock"


def readers_path(url: str) -> str:
    """Where the readers of an object-storage store put their markers: ``<store>.lock.readers/``."""
    return f"{lock_path(url)}.readers"


def _holder(purpose: str, shared: bool, brief: bool) -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose,
            "mode": "shared" if shared else "exclusive", "brief": bool(brief),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"), "token": uuid.uuid4().hex}


def _describe_one(holder: dict[str, Any]) -> str:
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
            f"{holder.get('purpose', '?')} since {holder.get('since', '?')}")


def _describe(holders: list[dict[str, Any]]) -> str:
    if not holders:
        return "another tilewise run (holder not yet written)"
    if len(holders) == 1:
        return f"another tilewise run ({_describe_one(holders[0])})"
    shown = "; ".join(_describe_one(h) for h in holders[:3]) + ("; ..." if len(holders) > 3 else "")
    return f"{len(holders)} other tilewise runs ({shown})"


def _busy(url: str, lock: str, holders: list[dict[str, Any]], waited: float, remote: bool) -> StoreBusy:
    hint = f"waited {waited:.0f} s" if waited > 0 else f"set {WAIT_ENV}=SECONDS to wait for it"
    if remote:
        hint += "; if that run is gone, remove the marker by hand"
    verb = "holds" if len(holders) <= 1 else "hold"
    return StoreBusy(url, f"{_describe(holders)} {verb} the lock {lock}; try again when it has finished ({hint})")


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(raw.decode() or "null")
    except ValueError:  # written by the holder a moment ago, not yet complete
        return None
    return data if isinstance(data, dict) else None


def _parse_lines(raw: bytes) -> list[dict[str, Any]]:
    """The holders a local lock file names, one JSON object a line (a line being written is
    skipped), less the readers that wrote a ``{"left": token}`` line on release."""
    lines = [h for h in (_parse(line) for line in raw.splitlines() if line.strip()) if h]
    left = {h["left"] for h in lines if "left" in h}
    return [h for h in lines if "left" not in h and h.get("token") not in left]


def _is_writer(holder: dict[str, Any]) -> bool:
    return holder.get("mode", "exclusive") != "shared"  # files written before readers existed: writers


def _limit(wait: float, brief: bool, holders: list[dict[str, Any]], readers_only: bool) -> float:
    """How long this run may wait for ``holders``: ``wait``, or the brief wait when a brief writer
    holds the store or this brief write waits for readers only."""
    if any(h.get("brief") and _is_writer(h) for h in holders) or (brief and readers_only):
        return max(wait, brief_wait())
    return wait


@contextmanager
def store_lock(url: str, wait: float | None = None, purpose: str = "write", *, shared: bool = False,
               brief: bool = False) -> Iterator[str]:
    """Hold the lock of the scan group at ``url`` (local path or fsspec URL) for the block.

    ``shared``: a reader's lock (many at once, never beside a writer). ``brief``: a short write
    that waits for readers, and is waited for, up to :func:`brief_wait` (module docstring).
    ``wait``: seconds to wait for another run to finish (None: :func:`default_wait`). Raises
    :class:`StoreBusy` (a ``ScanError``, one line) when the lock is still held after that.
    ``purpose`` ("ingest", "infer", "export", ...) is written into the lock for the other run's
    message. Yields the lock's path.
    """
    url = str(url).rstrip("/")
    wait = default_wait() if wait is None else max(0.0, float(wait))
    fs, path = fsspec.core.url_to_fs(url)
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    lock = lock_path(path)
    key = (f"{fs.protocol}:{lock}", threading.get_ident())
    with _held_guard:
        held = _held.get(key)
        if held is not None:
            if held[1] and not shared:
                raise RuntimeError(f"{url}: this thread reads the store and asks to write it: release the shared "
                                   "lock first, then take the exclusive one and check the marks")
            _held[key] = (held[0] + 1, held[1])
    if held is not None:  # this thread holds it already (a writer covers a reader)
        try:
            yield lock if local else lock_path(url)
        finally:
            with _held_guard:
                depth, mode = _held[key]
                _held[key] = (depth - 1, mode)
        return
    if local:
        release = _acquire_local(url, lock, wait, purpose, shared, brief)
    else:
        release = _acquire_marker(url, fs, lock, wait, purpose, shared, brief)
    with _held_guard:
        _held[key] = (1, shared)
    try:
        yield lock if local else lock_path(url)
    finally:
        with _held_guard:
            _held.pop(key, None)
        release()


def _acquire_local(url: str, lock: str, wait: float, purpose: str, shared: bool, brief: bool):
    os.makedirs(os.path.dirname(lock) or ".", exist_ok=True)
    start = time.monotonic()
    me = _holder(purpose, shared, brief)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holders = _parse_lines(os.pread(fd, HOLDERS_MAX_BYTES, 0))
            readers_only = False
            if not shared:  # a writer held off: by readers only when a shared lock is free to take
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    readers_only = True
                except BlockingIOError:
                    pass
            os.close(fd)
            holders = _live(holders, readers_only)
            limit = _limit(wait, brief, holders, readers_only)
            left = start + limit - time.monotonic()
            if left <= 0:
                raise _busy(url, lock, holders, limit, remote=False) from None
            time.sleep(min(POLL_SECONDS, left))
            continue
        except OSError as exc:
            os.close(fd)
            raise OSError(exc.errno, f"cannot lock {lock} (does this filesystem support flock?): "
                                     f"{exc.strerror}") from exc
        if not _same_file(fd, lock):
            os.close(fd)  # locked a file its holder deleted on release: take the new one
            continue
        line = (json.dumps(me) + "\n").encode()
        joined = False
        if shared:
            if os.fstat(fd).st_size < HOLDERS_MAX_BYTES:  # beside the other readers' lines, atomically
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
                os.write(fd, line)
                joined = True
        else:
            stale = [h for h in _parse_lines(os.pread(fd, HOLDERS_MAX_BYTES, 0)) if _is_writer(h)]
            if stale:  # left by a run that died holding it (the kernel dropped its flock)
                log.warning("%s: taking over the lock of a run that ended without releasing it (%s)",
                            url, _describe_one(stale[-1]))
            os.ftruncate(fd, 0)
            os.pwrite(fd, line, 0)
        break

    def release() -> None:
        try:
            if shared:  # the last reader out deletes the file: only it can turn its lock exclusive
                if joined:  # appended, so the other readers' lines stay whole; no longer named
                    os.write(fd, (json.dumps({"left": me["token"]}) + "\n").encode())
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return  # other readers still hold it
                if not _same_file(fd, lock):
                    return
            os.unlink(lock)  # still holding the flock: a waiter sees the inode change and retries
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)

    return release


def _same_file(fd: int, path: str) -> bool:
    mine = os.fstat(fd)
    try:
        there = os.stat(path)
    except FileNotFoundError:
        return False
    return (there.st_ino, there.st_dev) == (mine.st_ino, mine.st_dev)


def _live(holders: list[dict[str, Any]], readers_only: bool) -> list[dict[str, Any]]:
    """The holders worth naming: readers when only readers hold it, else the last writer; lines
    of dead processes of this host left out (a reader does not remove its line on release)."""
    here = socket.gethostname()
    if readers_only:
        wanted = [h for h in holders if not _is_writer(h)]
    else:
        writers = [h for h in holders if _is_writer(h)]
        wanted = writers[-1:]
    alive = [h for h in wanted if not (h.get("host") == here and isinstance(h.get("pid"), int)
                                       and not _pid_alive(h["pid"]))]
    unique = {json.dumps(h, sort_keys=True): h for h in alive}
    return list(unique.values())


@contextmanager
def _host_guard(lock: str) -> Iterator[None]:
    """A host-local flock serialising stale-marker replacement among this host's processes."""
    name = hashlib.sha256(lock.encode()).hexdigest()[:24]
    folder = os.path.join(tempfile.gettempdir(), "tilewise-locks")
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, name), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _dead_here(holder: dict[str, Any] | None) -> bool:
    return bool(holder) and holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
        and not _pid_alive(holder["pid"])


def _read_marker(fs, lock: str) -> tuple[bytes, dict[str, Any] | None] | None:
    try:
        raw = fs.cat_file(lock)
    except FileNotFoundError:
        return None
    return raw, _parse(raw)


def _writer_marker(url: str, fs, lock: str) -> dict[str, Any] | None:
    """The writer holding the store (its marker's content, ``{}`` while unreadable), None when there
    is none. A dead local writer's marker is removed (under the host guard) and not reported."""
    while True:
        seen = _read_marker(fs, lock)
        if seen is None:
            return None
        raw, other = seen
        if not _dead_here(other):
            return other or {}
        with _host_guard(lock):
            again = _read_marker(fs, lock)
            if again is not None and again[0] == raw:  # still the dead run's marker
                log.warning("%s: removing the lock marker of a dead run (%s)", url, _describe([other]))
                fs.rm_file(lock)


def _reader_markers(url: str, fs, folder: str, mine: str | None = None) -> list[dict[str, Any]]:
    """The readers holding the store; markers of dead local readers are removed."""
    fs.invalidate_cache(folder)  # a listing cached by fsspec would hide a reader that came since
    try:
        names = fs.ls(folder, detail=False)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        name = fs._strip_protocol(name)
        if mine is not None and name == fs._strip_protocol(mine):
            continue
        seen = _read_marker(fs, name)
        if seen is None:
            continue  # released since the listing
        holder = seen[1] or {}
        if _dead_here(holder):
            log.warning("%s: removing the reader marker of a dead run (%s)", url, _describe([holder]))
            try:
                fs.rm_file(name)
            except FileNotFoundError:
                pass
            continue
        found.append(holder)
    return found


def _acquire_marker(url: str, fs, lock: str, wait: float, purpose: str, shared: bool, brief: bool):
    start = time.monotonic()
    holder = _holder(purpose, shared, brief)
    data = json.dumps(holder).encode()
    folder = f"{lock}.readers"  # readers_path of the store
    mine = f"{folder}/{holder['token']}"
    while True:
        readers_only = False
        if shared:
            fs.pipe_file(mine, data)  # first my marker, then look for a writer's
            writer = _writer_marker(url, fs, lock)
            if writer is None:
                break
            fs.rm_file(mine)  # a writer holds it: back off
            holders = [writer]
        else:
            try:
                fs.pipe_file(lock, data, mode="create")
            except FileExistsError:
                writer = _writer_marker(url, fs, lock)
                if writer is None:
                    continue  # released (or a dead run's, removed) between our attempt and the read
                holders = [writer]
            else:  # first my marker, then look for readers'
                holders = _reader_markers(url, fs, folder)
                if not holders:
                    break
                fs.rm_file(lock)  # readers hold it: back off
                readers_only = True
        limit = _limit(wait, brief, holders, readers_only)
        left = start + limit - time.monotonic()
        if left <= 0:
            where = fs.unstrip_protocol(folder if readers_only else lock)
            raise _busy(url, where, holders, limit, remote=True)
        # jittered: a reader and a writer that backed off together do not meet again in step
        time.sleep(min(POLL_SECONDS * random.uniform(0.5, 1.5), left))

    def release() -> None:
        target = mine if shared else lock
        seen = _read_marker(fs, target)
        if seen is None or (seen[1] or {}).get("token") != holder["token"]:
            log.warning("%s: the lock marker was removed or replaced while this run held it", url)
            return
        fs.rm_file(target)

    return release


__all__ = ["StoreBusy", "brief_wait", "default_wait", "lock_path", "readers_path", "store_lock"]

"""One writer per scan group: a lock beside the store, held by the run that writes it.

Ingest and infer take the same lock (``store_lock``), so an ingest can never remove a group while
an infer writes its prediction, and two runs of either never interleave their writes. A second
run waits up to ``wait`` seconds (``TILEWISE_LOCK_WAIT``, default 0: fail at once) and then fails
with one line naming the holder::

    /data/SCAN.zarr: another tilewise run (pid 4242 on node7, ingest since 2026-05-01T02:00:03+00:00)
    holds the lock /data/SCAN.zarr.lock; ...

It never removes or rewrites anything the holder wrote.

- Local stores (and any POSIX mount): ``<store>.lock``, locked with ``fcntl.flock`` and holding the
  holder's pid, host, purpose and start time (JSON; for the message only). The kernel drops a flock
  when its process dies, kill -9 included, so a lock file left by a dead run never blocks: the next
  run takes it at once. The holder deletes the file on release; a waiter that locked a file just
  deleted notices (inode changed) and retries. Over NFS, Linux maps flock to NFS byte-range locks
  (NFSv4, or v3 with lockd); a FUSE mount without lock support fails with the OS error.
- Object storage (any other fsspec protocol): a marker object ``<store>.lock`` created with
  ``pipe_file(mode="create")``: an atomic create-if-absent on S3 (``If-None-Match: *``; AWS S3 and
  MinIO since 2024-11), on other backends fsspec's exists-then-write, which leaves a short race.
  A marker whose holder ran on this host and is dead (no such pid) is stale and replaced (under a
  host-local flock, so two local waiters never both replace it). A marker from another host is
  never removed automatically: the message says so, and ``rm`` of the marker is the manual fix.
- One distributed infer is one run: the driver holds the lock for the whole run; its Dask workers
  write only their own output chunks and take no lock (tasks/engine/distributed.py).
- Re-entrant within one thread (a run that already holds the lock may call code that takes it);
  another thread of the same process is another writer and waits like another process.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
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
POLL_SECONDS = 0.25
_held: dict[str, tuple[int, int]] = {}  # lock path -> (thread id, depth)
_held_guard = threading.Lock()


class StoreBusy(ScanError):
    """Another tilewise run holds the store's lock (transient: the same command later will work)."""


def default_wait() -> float:
    """Seconds a run waits for a busy store: ``$TILEWISE_LOCK_WAIT``, default 0 (fail at once)."""
    raw = os.environ.get(WAIT_ENV, "0")
    try:
        return max(0.0, float(raw))
    except ValueError:
        raise ValueError(f"{WAIT_ENV} must be a number of seconds, got {raw!r}") from None


def lock_path(url: str) -> str:
    """The lock's location, beside the store: ``<store>.lock`` (as a URL when the store is one)."""
    return f"{str(url).rstrip('/')}.lock"


def _holder(purpose: str) -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose,
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"), "token": uuid.uuid4().hex}


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another tilewise run (holder not yet written)"
    return (f"another tilewise run (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
            f"{holder.get('purpose', '?')} since {holder.get('since', '?')})")


def _busy(url: str, lock: str, holder: dict[str, Any] | None, waited: float, remote: bool) -> StoreBusy:
    hint = f"waited {waited:.0f} s" if waited > 0 else f"set {WAIT_ENV}=SECONDS to wait for it"
    if remote:
        hint += "; if that run is gone, remove the marker by hand"
    return StoreBusy(url, f"{_describe(holder)} holds the lock {lock}; try again when it has finished ({hint})")


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(raw.decode() or "null")
    except ValueError:  # written by the holder a moment ago, not yet complete
        return None
    return data if isinstance(data, dict) else None


@contextmanager
def store_lock(url: str, wait: float | None = None, purpose: str = "write") -> Iterator[str]:
    """Hold the lock of the scan group at ``url`` (local path or fsspec URL) for the block.

    ``wait``: seconds to wait for another run to finish (None: :func:`default_wait`). Raises
    :class:`StoreBusy` (a ``ScanError``, one line) when the lock is still held after that.
    ``purpose`` ("ingest", "infer", ...) is written into the lock for the other run's message.
    Yields the lock's path.
    """
    url = str(url).rstrip("/")
    wait = default_wait() if wait is None else max(0.0, float(wait))
    fs, path = fsspec.core.url_to_fs(url)
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    lock = lock_path(path)
    key = f"{fs.protocol}:{lock}"
    me = threading.get_ident()
    with _held_guard:
        owner = _held.get(key)
        if owner is not None and owner[0] == me:
            _held[key] = (me, owner[1] + 1)
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield lock if local else lock_path(url)
        finally:
            with _held_guard:
                tid, depth = _held[key]
                _held[key] = (tid, depth - 1)
        return
    if local:
        release = _acquire_local(url, lock, wait, purpose)
    else:
        release = _acquire_marker(url, fs, lock, wait, purpose)
    with _held_guard:
        _held[key] = (me, 1)
    try:
        yield lock if local else lock_path(url)
    finally:
        with _held_guard:
            _held.pop(key, None)
        release()


def _acquire_local(url: str, lock: str, wait: float, purpose: str):
    os.makedirs(os.path.dirname(lock) or ".", exist_ok=True)
    deadline = time.monotonic() + wait
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _parse(os.pread(fd, 4096, 0))
            os.close(fd)
            left = deadline - time.monotonic()
            if left <= 0:
                raise _busy(url, lock, holder, wait, remote=False) from None
            time.sleep(min(POLL_SECONDS, left))
            continue
        except OSError as exc:
            os.close(fd)
            raise OSError(exc.errno, f"cannot lock {lock} (does this filesystem support flock?): "
                                     f"{exc.strerror}") from exc
        mine = os.fstat(fd)
        try:
            there = os.stat(lock)
        except FileNotFoundError:
            there = None
        if there is None or (there.st_ino, there.st_dev) != (mine.st_ino, mine.st_dev):
            os.close(fd)  # locked a file its holder deleted on release: take the new one
            continue
        stale = _parse(os.pread(fd, 4096, 0))
        if stale:  # left by a run that died holding it (the kernel dropped its flock)
            log.warning("%s: taking over the lock of a run that ended without releasing it (%s)",
                        url, _describe(stale).removeprefix("another tilewise run "))
        data = json.dumps(_holder(purpose)).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        break

    def release() -> None:
        try:
            os.unlink(lock)  # still holding the flock: a waiter sees the inode change and retries
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)

    return release


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


def _read_marker(fs, lock: str) -> tuple[bytes, dict[str, Any] | None] | None:
    try:
        raw = fs.cat_file(lock)
    except FileNotFoundError:
        return None
    return raw, _parse(raw)


def _acquire_marker(url: str, fs, lock: str, wait: float, purpose: str):
    deadline = time.monotonic() + wait
    holder = _holder(purpose)
    data = json.dumps(holder).encode()
    here = socket.gethostname()
    while True:
        try:
            fs.pipe_file(lock, data, mode="create")
            break
        except FileExistsError:
            pass
        seen = _read_marker(fs, lock)
        if seen is None:
            continue  # released between our attempt and the read
        raw, other = seen
        if other and other.get("host") == here and isinstance(other.get("pid"), int) \
                and not _pid_alive(other["pid"]):
            with _host_guard(lock):
                again = _read_marker(fs, lock)
                if again is not None and again[0] == raw:  # still the dead run's marker
                    log.warning("%s: removing the lock marker of a dead run (%s)", url, _describe(other))
                    fs.rm_file(lock)
            continue
        left = deadline - time.monotonic()
        if left <= 0:
            raise _busy(url, fs.unstrip_protocol(lock), other, wait, remote=True)
        time.sleep(min(POLL_SECONDS, left))

    def release() -> None:
        seen = _read_marker(fs, lock)
        if seen is None or (seen[1] or {}).get("token") != holder["token"]:
            log.warning("%s: the lock marker was removed or replaced while this run held it", url)
            return
        fs.rm_file(lock)

    return release


__all__ = ["StoreBusy", "default_wait", "lock_path", "store_lock"]

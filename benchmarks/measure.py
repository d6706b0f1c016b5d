"""Memory probes the benchmarks share: each measurement runs in a fresh worker process that reads
its own resident set from /proc (Linux), resets the peak mark before the measured step and reads it
after."""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path


def proc_status(field: str) -> int:
    """A /proc/self/status field (kB) in bytes; 0 if unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss() -> int:
    """This process's resident set, bytes."""
    value = proc_status("VmRSS")
    if value:
        return value
    import psutil

    return psutil.Process().memory_info().rss


def maxrss() -> int:
    """getrusage's peak resident set, bytes. On Linux it keeps the peak of the image exec replaced
    (the parent's at fork) and clear_refs does not lower it: prefer VmHWM after ``reset_peak``."""
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru if sys.platform == "darwin" else ru * 1024


def reset_peak() -> bool:
    """Reset this process's peak RSS mark (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (Linux), or "?"."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


RESULT_MARK = "BENCH_RESULT "


def run_worker(script: str, job: dict, timeout: float) -> dict:
    """Run ``script --worker JOB`` in a fresh interpreter (the repository first on its path, stderr
    shown live) and return the JSON the worker printed after ``RESULT_MARK``."""
    import json
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(script), "--worker", json.dumps(job)]
    env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.setdefault("PYTHONWARNINGS", "ignore")
    proc = subprocess.run(cmd, cwd=str(repo), env=env, stdout=subprocess.PIPE, text=True, timeout=timeout,
                          check=False)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    raise RuntimeError(f"worker {job} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}")


def settle(folder) -> None:
    """Write back what the last run left dirty and drop those files' pages from the page cache, so
    the next run starts with the same free memory and no writeback of someone else's bytes in
    flight (without it, each kept 1 GiB store pushed the next runs into page-cache reclaim: writing
    1 GiB of chunk files took 0.3 s with free memory, up to 2.3 s of system time once the cache
    was full). The files stay (see the callers on why stores are not deleted between runs)."""
    os.sync()
    for path in Path(folder).rglob("*"):
        if path.is_file():
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

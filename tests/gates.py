"""Real processes paused mid-work: a script waits at a gate folder (writes ``paused``, waits for
``go``) so a test can race another process against it at a known point."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The child's environment: its own tilewise home, this checkout first on the path, no lock wait."""
    out = {**os.environ, "TILEWISE_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    out.pop("TILEWISE_LOCK_WAIT", None)
    out.update(extra)
    return out


def start_paused(tmp_path: Path, script: str, name: str, *args: str, timeout: float = 180
                 ) -> tuple[subprocess.Popen, Path]:
    """Run ``script`` (``python -c``; its argv[1] is the gate folder) and return once it is paused."""
    gate = tmp_path / f"gate-{name}"
    gate.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", script, str(gate), *args], cwd=ROOT, env=env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not (gate / "paused").exists():
        assert proc.poll() is None, f"the process ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, "the process never reached its gate"
        time.sleep(0.02)
    return proc, gate

"""``benchmarks/engine_io.py`` runs end to end (``--quick --cases 2d --repeats 2``): tilewise and the
I/O limit alternate and their medians count, the I/O limit writes the same bytes the engine wrote,
and the engine decodes each input chunk once."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_engine_io_benchmark_runs_and_compares_like_with_like(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/engine_io.py"), "--quick", "--cases", "2d",
                           "--repeats", "2", "--no-monai", "--json", "--workdir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(r["case"], r["size"]) for r in rows] == [("2d", 2048)]
    r = rows[0]
    assert len(r["tilewise_runs"]) == len(r["io_runs"]) == 2, r
    assert r["tilewise_seconds"] == pytest.approx(statistics.median(r["tilewise_runs"])), r
    assert r["io_seconds"] == pytest.approx(statistics.median(r["io_runs"])), r
    assert r["tilewise_over_io"] == pytest.approx(r["tilewise_seconds"] / r["io_seconds"]), r
    assert r["read_bytes"] == 3 * 2048 * 2048  # the 3-band uint8 input, read once
    assert r["io_written_bytes"] == r["written_bytes"] > 0, r  # the limit writes what the engine wrote
    assert r["arrays"][:3] == ["prediction/probabilities", "prediction/labels", "labels/prediction/0"], r
    assert r["decoded_ratio"] == 1.0, r  # every input chunk decoded once
    assert r["monai_seconds"] is None
    # CPU seconds of each side, from the kernel (getrusage), not the code: the runs did real work
    assert set(r["cpu"]) == {"tilewise", "io"}, r
    assert all(v["user_s"] > 0 and v["system_s"] >= 0 for v in r["cpu"].values()), r

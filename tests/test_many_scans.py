"""benchmarks/many_scans.py --quick end to end (each run a process of its own, its own home): the
nightly over 10 then 30 tiny scans completes every scan, the second run over them does no work and
says so, one MLflow run holds each night whatever the number of scans, and the table of figures is printed
(slow: a few minutes on two busy cores, most of it the start of seven processes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.scale
def test_many_scans_quick(tmp_path):
    out = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "many_scans.py"), "--quick", "--json", str(out),
                           "--workdir", str(tmp_path / "work"), "--reference-sample", "10"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {r["n"]: r for r in json.loads(out.read_text())}
    assert sorted(results) == [10, 30]
    assert "measured_scans" not in results[10]["reference"] and results[10]["reference"]["scans"] == 10
    assert results[30]["reference"]["measured_scans"] == 10  # 10 of 30 measured, scaled to 30
    assert results[30]["reference"]["seconds"] == pytest.approx(3 * results[30]["reference"]["measured_seconds"])
    for n, r in results.items():
        first, again = r["first"], r["unchanged"]
        assert first["completed"] and first["failed"] == [] and first["scans"] == n
        assert again["completed"] and again["scans"] == n and again["steps_did_work"] == 0  # "unchanged" kept
        assert first["mlflow_runs"] == 1  # the night's run; no run per scan
        assert again["mlflow_runs"] == 1  # a night that did nothing leaves none
    # the figures it prints (not asserted: timings on a shared machine are the benchmark's, never a test's)
    assert all(r["unchanged"]["seconds"] > 0 and r["first"]["peak_rss"] > 0 for r in results.values())
    assert "| 30 |" in proc.stdout

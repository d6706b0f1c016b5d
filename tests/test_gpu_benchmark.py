"""``benchmarks/gpu.py`` runs end to end where there is no GPU (``--device cpu --quick --repeats
2``), so the script is ready for the first lent one: every network's bare forward covers the tiles the engine
ran, the engine's autocast run stays close to its float32 run, and each figure is there."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_benchmark_runs_on_the_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu.py"), "--device", "cpu", "--quick", "--json",
                           "--repeats", "2", "--workdir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["model"] for r in rows] == ["unet3d", "unet2d", "deeplab"]
    for r in rows:
        assert r["device"] == "cpu"
        assert r["tiles"] == r["engine_tiles"] > 1, r  # the bare forward ran what the engine ran
        assert len(r["bare_runs"]) == len(r["tilewise_runs"]) == 2, r  # --repeats 2: medians of two each
        assert r["tilewise_seconds"] == pytest.approx(sum(r["tilewise_runs"]) / 2), r
        assert r["bare_over_tilewise"] == pytest.approx(r["bare_seconds"] / r["tilewise_seconds"]), r
        for key in ("bare_seconds", "tilewise_seconds", "monai_seconds", "bf16_seconds", "peak_device_mb"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        # bf16 keeps 8 bits of mantissa: probabilities move, by little
        assert 0 < r["bf16_max_dp"] < 0.25, r
        assert "fp16_seconds" not in r  # fp16 autocast is offered on CUDA only

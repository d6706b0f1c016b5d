#!/usr/bin/env python
"""Benchmark: CPU inference backends (``tasks.engine.backends``) against eager PyTorch.

    .venv/bin/python benchmarks/backends.py [--models unet3d,unet2d,deeplab]
        [--backends eager,onnx,openvino,compile] [--rounds 2] [--threads 2] [--workdir DIR]
        [--compile-rounds 1] [--modes bare,engine]

Models (``models.zoo.build``, random weights from ``torch.manual_seed(0)``, eval, 1 input channel,
2 classes), 4 tiles per model call:

* ``unet3d``:  U-Net 3D, channels 16-32-64-128 (MONAI, 2 residual units, instance norm), 96³ tiles,
               on a 128³ scan (8 tiles at overlap 0.5).
* ``unet2d``:  U-Net 2D, 16 base channels, 4 levels, 256² tiles, on a 4 x 768² scan (100 tiles).
* ``deeplab``: DeepLab v3+ (ResNet-18, output stride 16), 512² tiles, on a 2 x 1024² scan (18 tiles).

Inputs: smooth random volumes (``benchmarks/engine.py``'s plane-wave generator), written as
``.nii`` and ingested with ``tasks.ingest.to_zarr.ingest_scan``; cached under ``--workdir``.

Measured, each in a fresh subprocess, ``torch.set_num_threads(--threads)`` (ONNX Runtime and
OpenVINO get the same count), the variants interleaved round by round; the best of the rounds counts:

* ``bare``:   the backend's own forward (``backends.build_forward``: what the engine calls) on
              random tiles, as many tiles and in the same calls of 4 as the engine's plan. Before it:
              the conversion (export / compile + first call: ``prep``, reported on its own) and one
              warm-up call; then eager on one batch of the same input: ``max|Δlogits|``.
* ``engine``: ``infer_scan`` on a fresh copy of the scan, float32 output, with a ``ModelRunner`` of
              that backend already converted (one call on a tile of the plan's shape first) so the
              time is the steady state; ``tilewise ÷ bare`` = engine seconds ÷ that backend's bare
              seconds for the same tiles.
* ``compare``: max |Δ probability| between the backend's engine output and eager's.

``compile`` (``torch.compile``) is measured in bare mode only, ``--compile-rounds`` times, with
inductor's caches off (a cold compile); its compile time is long; the table says how many tiles it takes to pay it back (never, when slower).

Speed-up = eager bare seconds ÷ backend bare seconds. The load average is printed at start and end;
the machine may be shared, so read the ratios of one run, not seconds across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT_MARK = "BENCH_RESULT "
sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import load_average  # noqa: E402

MODELS = {
    "unet3d": {"build": ("unet", 3, 1, 2), "args": {"channels": [16, 32, 64, 128]}, "tile": [96, 96, 96],
               "scan": [128, 128, 128]},
    "unet2d": {"build": ("unet", 2, 1, 2), "args": {"base_channels": 16, "levels": 4}, "tile": [256, 256],
               "scan": [4, 768, 768]},
    "deeplab": {"build": ("deeplab", 2, 1, 2), "args": {}, "tile": [512, 512], "scan": [2, 1024, 1024]},
}
BATCH = 4


def _say(msg: str) -> None:
    print(f"    [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# workers


def _setup(job: dict):
    import torch

    torch.set_num_threads(int(job["threads"]))
    from models.zoo import build

    spec = MODELS[job["model"]]
    torch.manual_seed(0)
    model = build(*spec["build"], **spec["args"]).eval()
    return torch, model, spec


def _engine_tile(spec: dict) -> tuple[int, ...]:
    return tuple(spec["tile"]) if len(spec["tile"]) == 3 else (1, *spec["tile"])


def build_input(job: dict) -> dict:
    import nibabel as nib
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from engine import _smooth_volume_slab, smooth_waves

    from tasks.ingest.discover import ScanSpec
    from tasks.ingest.to_zarr import ingest_scan

    d, h, w = job["scan"]
    waves = smooth_waves()
    assert h == w
    vol = _smooth_volume_slab(0, d, h, waves)  # (k, j, i) = (d, h, w)
    nii = Path(job["nii"])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(vol.transpose(2, 1, 0)), np.eye(4)), str(nii))
    res = ingest_scan(ScanSpec(scan_id=nii.stem, modality="mri", sources=(nii,)), job["store"], force=True)
    return {"shape": list(res.shape)}


def _plan_sizes(job: dict, spec: dict) -> list[int]:
    import zarr

    from tasks.engine.plan import plan_tiles

    image = zarr.open_array(f"{job['store']}/image/0", mode="r")
    plan = plan_tiles(tuple(image.shape[1:]), _engine_tile(spec), 0.5, tuple(image.chunks[1:]), "even")
    n = plan.tile_count()
    return [BATCH] * (n // BATCH) + ([n % BATCH] if n % BATCH else [])


def run_bare(job: dict) -> dict:
    torch, model, spec = _setup(job)
    from tasks.engine.backends import build_forward

    sizes = _plan_sizes(job, spec)
    g = torch.Generator().manual_seed(1)
    x = torch.randn((BATCH, 1, *spec["tile"]), generator=g)

    def logits(out):
        return out["out"] if isinstance(out, dict) else out

    with torch.inference_mode():
        t0 = time.perf_counter()
        fn = build_forward(job["backend"], model, x)
        y = logits(fn(x))  # first call: compile / session warm-up
        prep = time.perf_counter() - t0
        fn(x)  # warm-up
        t0 = time.perf_counter()
        for b in sizes:
            fn(x[:b])
        seconds = time.perf_counter() - t0
        ref = logits(model(x)) if job["backend"] != "eager" else y
        diff = float((y.float() - ref).abs().max())
    return {"seconds": seconds, "tiles": sum(sizes), "prep_seconds": prep, "max_abs_logits": diff,
            "logit_scale": float(ref.abs().max())}


def run_engine(job: dict) -> dict:
    torch, model, spec = _setup(job)
    from models.card import ModelCard
    from tasks.engine.infer import EngineConfig, infer_scan
    from tasks.engine.model_io import LoadedModel
    from tasks.engine.runner import ModelRunner

    tile = _engine_tile(spec)
    dims = len(spec["tile"])
    card = ModelCard(classes=["background", "fg"], spatial_dims=dims, in_channels=1)
    cfg = EngineConfig(tile=tile, overlap=0.5, batch=BATCH, device="cpu", output_dtype="float32",
                       backend=job["backend"])
    squeeze = 2 if dims == 2 else None
    runner = ModelRunner(model, device="cpu", backend=job["backend"], squeeze_axis=squeeze)
    import numpy as np

    t0 = time.perf_counter()
    runner(np.zeros((1, 1, *tile), np.float32))  # converts for this tile shape
    runner(np.zeros((BATCH, 1, *tile), np.float32))  # warm-up
    prep = time.perf_counter() - t0
    runner.calls = 0
    shutil.copytree(job["store"], job["out"])
    loaded = LoadedModel(model, card, f"bench:{job['model']}-seed0")
    t0 = time.perf_counter()
    res = infer_scan(job["out"], loaded, cfg, runner=runner)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tiles": res.tiles, "status": res.status, "prep_seconds": prep}


def run_compare(job: dict) -> dict:
    import numpy as np
    import zarr

    def probs(store):
        g = zarr.open_group(store, mode="r")
        name = next(p for p in ("prediction/probabilities", "prediction/probs") if p in g) \
            if any(p in g for p in ("prediction/probabilities", "prediction/probs")) else None
        if name is None:
            arrays = [k for k, _ in g["prediction"].arrays()]
            name = "prediction/" + next(a for a in arrays if a.startswith("prob"))
        return np.asarray(g[name][...], dtype=np.float32)

    a, b = probs(job["a"]), probs(job["b"])
    return {"max_abs_probs": float(np.abs(a - b).max())}


WORKERS = {"build": build_input, "bare": run_bare, "engine": run_engine, "compare": run_compare}


# --------------------------------------------------------------------------------------------
# driver (imports nothing heavy)


def run_worker(job: dict, timeout: float = 1800) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if job.get("backend") == "compile":  # a cold compile, as a fresh machine pays it (no inductor cache)
        env["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
    env.setdefault("PYTHONWARNINGS", "ignore")
    proc = subprocess.run(cmd, cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=timeout, check=False)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = (proc.stderr or "").strip().splitlines()[-3:]
    return {"error": f"rc {proc.returncode}: " + " | ".join(tail)[-400:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="unet3d,unet2d,deeplab")
    ap.add_argument("--backends", default="eager,onnx,openvino,compile")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--compile-rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="bare,engine", help="bare,engine or bare (no engine runs)")
    ap.add_argument("--workdir", default="/tmp/tilewise-backends-bench")
    ap.add_argument("--worker")
    args = ap.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        print(RESULT_MARK + json.dumps(WORKERS[job["mode"]](job)), flush=True)
        return

    models = args.models.split(",")
    backends = args.backends.split(",")
    if "eager" not in backends:
        backends.insert(0, "eager")
    work = Path(args.workdir)
    (work / "inputs").mkdir(parents=True, exist_ok=True)
    print(f"# benchmarks/backends.py  models={','.join(models)} backends={','.join(backends)} "
          f"rounds={args.rounds} threads={args.threads}  load average at start: {load_average()}", flush=True)
    stores = {}
    for m in models:
        scan = MODELS[m]["scan"]
        name = f"scan{'x'.join(map(str, scan))}"
        store = work / "inputs" / f"{name}.zarr"
        if not (store / "image").exists():
            r = run_worker({"mode": "build", "scan": scan, "nii": str(work / "inputs" / f"{name}.nii"),
                            "store": str(store)})
            if "error" in r:
                sys.exit(f"building {name}: {r['error']}")
        stores[m] = str(store)

    results: dict = {}
    outs: dict = {}
    tmp = Path(tempfile.mkdtemp(prefix="runs-", dir=work))
    for rnd in range(args.rounds):
        order = backends if rnd % 2 == 0 else backends[::-1]
        for m in models:
            for b in order:
                modes = ["bare"] if b == "compile" or "engine" not in args.modes else ["bare", "engine"]
                if b == "compile" and rnd >= args.compile_rounds:
                    continue
                for mode in (modes if rnd % 2 == 0 else modes[::-1]):
                    job = {"mode": mode, "model": m, "backend": b, "threads": args.threads, "store": stores[m]}
                    if mode == "engine":
                        job["out"] = str(tmp / f"{m}-{b}-{rnd}.zarr")
                    r = run_worker(job)
                    results.setdefault((m, b, mode), []).append(r)
                    if mode == "engine" and "error" not in r:
                        outs[(m, b)] = job["out"]
                    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                    print(f"  round {rnd + 1} {m:8s} {b:9s} {mode:6s} {shown}", file=sys.stderr, flush=True)

    def best(m, b, mode):
        ok = [r for r in results.get((m, b, mode), []) if "error" not in r]
        return min(ok, key=lambda r: r["seconds"]) if ok else None

    print(f"\n| model | backend | bare s/tile | speed-up vs eager | prep s | pays back after (tiles) "
          f"| tilewise ÷ bare | max abs Δlogits | max abs Δprobs (engine) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in models:
        eb = best(m, "eager", "bare")
        for b in backends:
            bb, be = best(m, b, "bare"), best(m, b, "engine")
            if bb is None:
                errs = [r["error"] for r in results.get((m, b, "bare"), []) if "error" in r]
                print(f"| {m} | {b} | failed: {errs[0] if errs else '?'} | | | | | | |")
                continue
            per = bb["seconds"] / bb["tiles"]
            speed = (eb["seconds"] / eb["tiles"]) / per if eb else float("nan")
            eper = eb["seconds"] / eb["tiles"] if eb else float("nan")
            gain = eper - per
            payback = f"{bb['prep_seconds'] / gain:.0f}" if gain > 0 and b != "eager" else ("—" if b == "eager" else "never")
            ratio = f"{be['seconds'] / bb['seconds']:.2f}" if be and be["tiles"] == bb["tiles"] else "—"
            dprob = "—"
            if b != "eager" and (m, b) in outs and (m, "eager") in outs:
                c = run_worker({"mode": "compare", "a": outs[(m, "eager")], "b": outs[(m, b)]})
                dprob = f"{c['max_abs_probs']:.1e}" if "error" not in c else c["error"][:60]
            print(f"| {m} | {b} | {per:.4f} | {speed:.2f}x | {bb['prep_seconds']:.1f} | {payback} | {ratio} "
                  f"| {bb['max_abs_logits']:.1e} (of {bb['logit_scale']:.2g}) | {dprob} |", flush=True)
    print(f"\nload average at end: {load_average()}  (best of {args.rounds} rounds; each cell its own process)")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Benchmark: leaving out empty voxels on real scans — MONAI (Zarr read → infer → Zarr write) ÷ tilewise.

    .venv/bin/python benchmarks/skip_empty.py [--cases brats,landsat] [--workdir DIR] [--repeats 1]

Scans (``../shared/data``, never used by a test):

* ``brats``:   BraTS 2015 pat0006 (240 x 240 x 155, FLAIR + T1c, z-scored and skull-stripped: outside the
               brain every channel holds one constant), as the sample catalog reads it; the catalog's tile
               (32, 96, 96), batch 2; the zoo's 3D U-Net (16 base channels, one residual unit, 5 classes),
               random weights (``torch.manual_seed(0)``); ``skip_empty="corner"``.
* ``landsat``: rasterio's Landsat 7 scene RGB.byte.tif (791 x 718, 3 bands uint8, nodata 0 around the
               rotated swath: 33 % of the pixels); tile 256², batch 4; the zoo's 2D U-Net (16 base channels,
               2 classes); ``skip_empty="auto"`` (the declared nodata).

Measured, each run in a fresh subprocess, alternating order per repeat (best time kept):

* ``monai``:    the whole image read from the Zarr store into memory → ``sliding_window_inference`` (same
                tile, overlap 0.5, Gaussian, same batch) → softmax → float32 Zarr written with the same chunks.
* ``tilewise``: ``infer_scan`` with the empty-voxel rule (default engine options otherwise, float16 out).
* ``tw-off``:   ``infer_scan`` with ``skip_empty="off"``: every tile of the grid.
* ``bare``:     the network alone on as many random tiles as ``tilewise`` ran.

Printed per scan: tiles of the full grid / of the box of non-empty voxels / run, MONAI ÷ tilewise (aim
>= 1.3), MONAI ÷ tw-off, tilewise ÷ bare, and what leaving voxels out changes: over the non-empty
voxels, the share whose argmax differs from tw-off's and the largest probability difference (the
tiles are placed over the box instead of the whole scan, so their context differs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RESULT_MARK = "BENCH_RESULT "
sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import load_average, proc_status, reset_peak  # noqa: E402

CASES = {
    "brats": {"kind": "mri", "dims": 3, "tile": [32, 96, 96], "batch": 2, "classes": 5, "skip": "corner",
              "unet": {"num_res_units": 1},
              "sources": [str(DATA / "mri/brats2015_deepmedic/brats_2013_pat0006_1/Flair_subtrMeanDivStd.nii.gz"),
                          str(DATA / "mri/brats2015_deepmedic/brats_2013_pat0006_1/T1c_subtrMeanDivStd.nii.gz")]},
    "landsat": {"kind": "satellite", "dims": 2, "tile": [256, 256], "batch": 4, "classes": 2, "skip": "auto",
                "unet": {}, "sources": [str(DATA / "satellite/rasterio_landsat7_unlabeled/RGB.byte.tif")]},
}


def _model(case: dict, channels: int):
    import torch

    from models.zoo import build

    torch.manual_seed(0)
    return build("unet", case["dims"], channels, case["classes"], **case["unet"]).eval()


def work(job: dict) -> dict:
    import numpy as np
    import torch
    import zarr
    from monai.inferers import sliding_window_inference

    from tasks.engine.infer import EngineConfig, infer_scan
    from tasks.engine.model_io import LoadedModel, ModelCard
    from tasks.ingest.to_zarr import COMPRESSOR

    case = CASES[job["case"]]
    store = job["store"]
    image = zarr.open_array(f"{store}/image/0", mode="r")
    model = _model(case, image.shape[0])
    tile = tuple(case["tile"])
    baseline = proc_status("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    detail: dict = {}
    if job["mode"] == "monai":
        x = torch.from_numpy(np.asarray(image[...], dtype=np.float32))[None]
        with torch.inference_mode():
            probs = torch.softmax(sliding_window_inference(x, tile, case["batch"], model, overlap=0.5,
                                                           mode="gaussian"), 1)[0].numpy()
        out = zarr.create_array(store=job["out"], shape=probs.shape, dtype="float32", chunks=(1, *image.chunks[1:]),
                                compressors=COMPRESSOR, fill_value=0, zarr_format=3, overwrite=True)
        out[...] = probs
    elif job["mode"] == "bare":
        g = torch.Generator().manual_seed(1)
        x = torch.randn((case["batch"], image.shape[0], *tile), generator=g)
        left = job["tiles"]
        with torch.inference_mode():
            while left > 0:
                model(x[:min(left, case["batch"])])
                left -= case["batch"]
    else:
        shutil.rmtree(f"{store}/prediction", ignore_errors=True)
        config = EngineConfig(tile=tile, batch=case["batch"], skip_empty=case["skip"] if job["mode"] == "tilewise"
                              else "off")
        card = ModelCard(classes=[f"c{k}" for k in range(case["classes"])])
        res = infer_scan(store, LoadedModel(model, card, f"bench-{job['case']}-seed0"), config)
        record = json.loads(json.dumps(dict(zarr.open_group(f"{store}/prediction").attrs)["tilewise"]))
        detail = {"tiles": res.tiles, "tiles_skipped": res.tiles_skipped,
                  "region": record.get("complete", {}).get("valid_region")}
        shutil.rmtree(job["out"], ignore_errors=True)
        os.rename(f"{store}/prediction", job["out"])
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "working": proc_status("VmHWM") - baseline, **detail}


def compare(job: dict) -> dict:
    """Over the non-empty voxels: argmax disagreement share and max |p - q| of two predictions."""
    import numpy as np
    import zarr

    from tasks.engine.skip import resolve_rule
    from tasks import storage

    case = CASES[job["case"]]
    image = zarr.open_array(f"{job['store']}/image/0", mode="r")
    rule = resolve_rule(case["skip"], storage.read_record(job["store"]) or {}, image.shape[0], image)
    a = zarr.open_array(f"{job['a']}/probabilities", mode="r")[...].astype(np.float32)
    b = zarr.open_array(f"{job['b']}/probabilities", mode="r")[...].astype(np.float32)
    valid = ~rule.empty(np.asarray(image[...]))
    diff = np.abs(a - b).max(axis=0)[valid]
    return {"valid_fraction": float(valid.mean()), "max_abs": float(diff.max()),
            "argmax_differs": float((a.argmax(0) != b.argmax(0))[valid].mean())}


def ingest(job: dict) -> dict:
    from tasks.ingest.discover import ScanSpec
    from tasks.ingest.to_zarr import ingest_scan

    case = CASES[job["case"]]
    spec = ScanSpec(job["case"], case["kind"], tuple(Path(s) for s in case["sources"]))
    res = ingest_scan(spec, job["store"], force=True)
    return {"shape": list(res.shape)}


def run_worker(job: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, text=True, check=False)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    raise RuntimeError(f"worker {job} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="brats,landsat")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/tilewise-skip-bench"))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        fn = {"ingest": ingest, "compare": compare}.get(job["mode"], work)
        print(RESULT_MARK + json.dumps(fn(job)), flush=True)
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.cases.split(","):
        store = str(args.workdir / f"{name}.zarr")
        shape = run_worker({"mode": "ingest", "case": name, "store": store})["shape"]
        runs: dict[str, list[dict]] = {}
        for rep in range(args.repeats):
            order = ["monai", "tilewise", "tw-off"]
            for mode in order if rep % 2 == 0 else order[::-1]:
                out = str(args.workdir / f"{name}-{mode}.zarr")
                r = run_worker({"mode": mode, "case": name, "store": store, "out": out})
                runs.setdefault(mode, []).append(r)
                print(f"[{time.strftime('%H:%M:%S')}] {name} {mode}: {r['seconds']:.1f} s, working "
                      f"{r['working'] / 2**20:.0f} MiB {r.get('tiles', '')}", file=sys.stderr, flush=True)
        tw = min(runs["tilewise"], key=lambda r: r["seconds"])
        bare = run_worker({"mode": "bare", "case": name, "store": store, "tiles": tw["tiles"], "out": ""})
        diff = run_worker({"mode": "compare", "case": name, "store": store, "a": str(args.workdir / f"{name}-tilewise.zarr"),
                           "b": str(args.workdir / f"{name}-tw-off.zarr")})
        best = {m: min(r["seconds"] for r in rs) for m, rs in runs.items()}
        off = runs["tw-off"][0]
        rows.append((name, shape, off["tiles"], tw["tiles"] + tw["tiles_skipped"], tw["tiles"], tw["region"],
                     best, bare["seconds"], diff))
    print()
    print(f"Empty voxels on real scans — load average at end {load_average()}; "
          f"times are the best of {args.repeats} run(s), each in a fresh process")
    for name, shape, full, planned, ran, region, best, bare_s, diff in rows:
        print(f"{name}: image {shape}; tiles full grid {full}, over the non-empty box {planned} (box {region}), run {ran}")
        print(f"  MONAI {best['monai']:.1f} s, tilewise {best['tilewise']:.1f} s, tilewise skip off {best['tw-off']:.1f} s, "
              f"bare forward of the run tiles {bare_s:.1f} s")
        print(f"  MONAI / tilewise            {best['monai'] / best['tilewise']:6.2f}   (aim >= 1.3)")
        print(f"  MONAI / tilewise, skip off  {best['monai'] / best['tw-off']:6.2f}")
        print(f"  tilewise / bare forward     {best['tilewise'] / bare_s:6.2f}")
        print(f"  over the {100 * diff['valid_fraction']:.1f} % non-empty voxels vs skip off: argmax differs at "
              f"{100 * diff['argmax_differs']:.3f} %, max |p - q| {diff['max_abs']:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

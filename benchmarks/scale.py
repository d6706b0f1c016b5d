#!/usr/bin/env python
"""Benchmark: past 1 GiB. Does ingest + inference keep its memory and its speed at 16 GiB?

    .venv/bin/python benchmarks/scale.py [--em-gb 16] [--raster-gb 4] [--base-gb 1] [--workdir DIR]
                                         [--cases em,raster] [--region-tiles 64] [--keep]

Two cases, each at ``--base-gb`` and at its large size, every step in its own fresh process:

* ``em``: a uint8 EM stack (multi-page TIFF, 4096² sections, ``benchmarks/ingest.py``'s synthetic
  cell texture), 16 GiB by default (1,024 sections);
* ``raster``: a float32 single-band GeoTIFF (tiled 512², uncompressed), 4 GiB by default (32768²).

Steps per scan: ``ingest`` (level 0, pyramid, statistics, source sha256); ``infer`` with the trivial
network (``cat([x, -x])``: the engine's own work) over the whole scan, engine defaults but
``outputs="labels"`` (the probabilities of a 16 GiB stack would be 64 GiB of float16: more than
this machine's disk; the option exists for such runs); ``unet``: the zoo's 2D U-Net (random
weights; its cost does not depend on them) on a region of ``--region-tiles`` tiles' worth of
output chunks in the middle of the scan, through the engine's region API (``run_chunks``, as a
Dask worker runs its share). Printed per step: seconds, MB/s of scan, tiles/s, and working memory
(peak RSS above the worker's RSS after imports: VmHWM after resetting the mark), then the large ÷
base ratios. Targets: working memory ≤ 1.1× and throughput within 10 % of the base run.

Free disk is checked first (source + store + labels, with a margin); everything is removed after
each case unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure  # noqa: E402
GIB = 1 << 30
MB = 1e6


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# sources


def make_em(path: Path, size: int) -> list[int]:
    from ingest import make_tiff

    return make_tiff(path, size)["shape_source"]


def make_raster(path: Path, size: int) -> list[int]:
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    side = max(512, math.ceil(math.sqrt(size / 4) / 512) * 512)
    rng = np.random.default_rng(4)
    profile = dict(driver="GTiff", height=side, width=side, count=1, dtype="float32", crs="EPSG:32633",
                   transform=from_origin(399960.0, 5000040.0, 10.0, 10.0), tiled=True, blockxsize=512,
                   blockysize=512, BIGTIFF="YES")
    xx = np.arange(side, dtype=np.float32)[None, :]
    tmp = path.with_name(path.name + ".part")
    with rasterio.open(tmp, "w", **profile) as dst:
        for r0 in range(0, side, 512):
            yy = np.arange(r0, r0 + 512, dtype=np.float32)[:, None]
            val = np.sin(xx * np.float32(0.0021)) * np.cos(yy * np.float32(0.0017)) * np.float32(300)
            val += rng.standard_normal((512, side), dtype=np.float32) * np.float32(20)
            dst.write(val[None], window=Window(0, r0, side, 512))
    tmp.rename(path)
    return [side, side]


# --------------------------------------------------------------------------------------------
# workers


def _measure(run) -> dict:
    import gc

    import numpy  # noqa: F401
    import torch  # noqa: F401
    import zarr  # noqa: F401

    import tasks.engine.infer  # noqa: F401
    import tasks.ingest.to_zarr  # noqa: F401
    from measure import proc_status, reset_peak

    gc.collect()
    base = proc_status("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    detail = run()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "working": proc_status("VmHWM") - base, "detail": detail}


def _trivial():
    import torch

    class Trivial(torch.nn.Module):
        def forward(self, x):
            return torch.cat([x, -x], 1)

    return Trivial().eval()


def worker(job: dict) -> dict:
    step, store = job["step"], job["store"]
    if step == "ingest":
        from tasks.ingest.discover import ScanSpec
        from tasks.ingest.to_zarr import ingest_scan

        modality = "em" if job["case"] == "em" else "satellite"
        spec = ScanSpec(scan_id=job["case"], modality=modality, sources=(Path(job["source"]),),
                        **({"spacing": (40.0, 8.0, 8.0), "unit": "nanometer"} if modality == "em" else {}))

        def run():
            res = ingest_scan(spec, store, force=True)
            return {"shape": list(res.shape)}

        return _measure(run)

    import zarr

    from models.card import ModelCard
    from tasks.engine.infer import EngineConfig, infer_scan, prepare, run_chunks
    from tasks.engine.model_io import LoadedModel
    from tasks.export.ngff import remove_prediction

    remove_prediction(store)
    image = zarr.open_array(f"{store}/image/0", mode="r")
    in_channels = image.shape[0]
    config = EngineConfig(tile=(256, 256), overlap=0.25, device="cpu", outputs="labels")
    if step == "infer":
        model = LoadedModel(_trivial(), ModelCard(spatial_dims=2), "bench:trivial")

        def run():
            res = infer_scan(store, model, config)
            return {"tiles": res.tiles, "status": res.status}

        out = _measure(run)
    else:  # unet on a region in the middle of the scan
        import torch

        from models.zoo import build

        torch.manual_seed(0)
        net = build("unet", 2, in_channels, 2)
        card = ModelCard(architecture="unet", in_channels=in_channels, classes=["background", "foreground"],
                         spatial_dims=2, tile=[256, 256])
        model = LoadedModel(net.eval(), card, "bench:unet2d-seed0")
        prep = prepare(store, model, config)
        grid = prep.plan.chunk_grid
        chunk = prep.plan.chunks
        tiles_per_chunk = max(1, (chunk[-1] // 192) * (chunk[-2] // 192))
        want = max(1, job["region_tiles"] // tiles_per_chunk)
        side = max(1, int(math.sqrt(want)))
        mid = [g // 2 for g in grid]
        region = set()
        lead = tuple(mid[:-2])  # a 3D stack: one section in the middle
        for i in range(side):
            for j in range(side):
                y, x = min(grid[-2] - 1, mid[-2] - side // 2 + i), min(grid[-1] - 1, mid[-1] - side // 2 + j)
                region.add((*lead, y, x))

        def run():
            res = run_chunks(prep, model, region)
            return {"tiles": res.tiles, "chunks": len(region)}

        out = _measure(run)
    return out


def run_worker(job: dict, timeout: float = 3600) -> dict:
    return measure.run_worker(__file__, job, timeout)


def run_case(case: str, gb: float, workdir: Path, region_tiles: int, keep: bool) -> dict:
    size = int(gb * GIB)
    src = workdir / (f"{case}-{gb:g}.tif")
    store = workdir / f"{case}-{gb:g}.zarr"
    # source + image store (incompressible at worst) + pyramid (a third) + labels (compress well)
    need = int(size * 2.6) + 2 * GIB
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise SystemExit(f"error: {workdir}: {case} at {gb:g} GiB needs about {need / GIB:.0f} GiB free, "
                         f"{free / GIB:.0f} GiB are")
    try:
        t0 = time.perf_counter()
        shape = (make_em if case == "em" else make_raster)(src, size)
        _say(f"{case} {gb:g} GiB: source {shape} written in {time.perf_counter() - t0:.0f} s")
        job = {"case": case, "source": str(src), "store": str(store), "region_tiles": region_tiles}
        out = {"case": case, "gb": gb, "bytes": size, "shape": shape}
        for step in ("ingest", "infer", "unet"):
            r = run_worker({**job, "step": step})
            out[step] = r
            _say(f"{case} {gb:g} GiB: {step} {r['seconds']:.1f} s, working {r['working'] / MB:.0f} MB "
                 f"{r['detail']}")
        return out
    finally:
        if not keep:
            shutil.rmtree(store, ignore_errors=True)
            src.unlink(missing_ok=True)
            Path(str(store) + ".lock").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--em-gb", type=float, default=16)
    ap.add_argument("--raster-gb", type=float, default=4)
    ap.add_argument("--base-gb", type=float, default=1)
    ap.add_argument("--cases", default="em,raster")
    ap.add_argument("--region-tiles", type=int, default=64, help="tiles' worth of output chunks for the U-Net")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/tilewise-scale"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        import tasks.codecs  # noqa: F401

        print(measure.RESULT_MARK + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
        big = args.em_gb if case == "em" else args.raster_gb
        results.append((run_case(case, args.base_gb, args.workdir, args.region_tiles, args.keep),
                        run_case(case, big, args.workdir, args.region_tiles, args.keep)))
    print(f"\n{'case':14s} {'step':7s} {'seconds':>8s} {'MB/s':>7s} {'tiles/s':>8s} {'working MB':>10s} "
          f"{'MB/s ÷ base':>11s} {'memory ÷ base':>13s}")
    for base, big in results:
        for r in (base, big):
            for step in ("ingest", "infer", "unet"):
                s = r[step]
                rate = r["bytes"] / MB / s["seconds"] if step != "unet" else float("nan")
                tiles = s["detail"].get("tiles")
                tps = f"{tiles / s['seconds']:8.1f}" if tiles else f"{'-':>8s}"
                if r is big:
                    b = base[step]
                    if step == "unet":
                        speed = (tiles / s["seconds"]) / (b["detail"]["tiles"] / b["seconds"])
                    else:
                        speed = rate / (base["bytes"] / MB / b["seconds"])
                    ratios = f"{speed:11.2f} {s['working'] / max(b['working'], 1):13.2f}"
                else:
                    ratios = f"{'':11s} {'':13s}"
                print(f"{r['case'] + ' ' + format(r['gb'], 'g') + ' GiB':14s} {step:7s} {s['seconds']:8.1f} "
                      f"{rate:7.0f} {tps} {s['working'] / MB:10.0f} {ratios}")
    print("targets: large ÷ base throughput ≥ 0.90, working memory ≤ 1.10; unet: tiles/s on a region of "
          f"{args.region_tiles} tiles' chunks; infer: trivial network, --outputs labels")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Benchmark: the engine on one accelerator, ready for the first lent GPU (under 5 minutes).

    .venv/bin/python benchmarks/gpu.py [--device cuda|cpu] [--quick] [--models unet3d,unet2d,deeplab] [--json]
                                       [--repeats N]

For each of the zoo's networks (random weights from seed 0; the cost of a forward does not depend
on them), in its own process, on the same device:

* ``bare``: the network alone over as many tiles as the engine's plan of the scan has, in batches
  of ``--batch``, on random input already on the device (synchronised): tiles/s.
* ``tilewise``: ``infer_scan`` end to end (Zarr read, normalisation, network, blending, float16
  probabilities, labels, label pyramid, marks), float32: bare ÷ tilewise (aim ≥ 0.8).
* ``monai``: the whole image read from Zarr onto the device, ``sliding_window_inference`` there
  (same tile, overlap, Gaussian), softmax, probabilities and labels back and written to Zarr:
  MONAI ÷ tilewise.
* ``bf16`` / ``fp16``: ``infer_scan`` under autocast; seconds and the largest probability difference
  from the float32 run (fp16 only on CUDA).
* ``--repeats N``: N bare / tilewise float32 pairs, alternating which goes first; the medians
  count and every run is printed (a shared machine's speed drifts by tens of percent).
* peak device memory of the float32 tilewise run (``torch.cuda.max_memory_allocated``; on the CPU
  the peak RSS above the worker's RSS after imports).

Scans are synthetic (smooth fields, built once per run in a temporary folder through the real
ingest): 3D 256³ (``--quick`` 48³) float32 for the 3D U-Net, 2D 4096² (``--quick`` 160²) 3-band
for the 2D networks. Tiles: the engine defaults (96³ overlap 0.5; 256² overlap 0.25), ``--quick``
32³ / 64². ``tests/test_gpu_benchmark.py`` runs ``--device cpu --quick --repeats 2``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure  # noqa: E402

MODELS = {  # name: (architecture, spatial dims, input channels)
    "unet3d": ("unet", 3, 1),
    "unet2d": ("unet", 2, 3),
    "deeplab": ("deeplab", 2, 3),
}


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _scan(workdir: Path, dims: int, channels: int, size: int) -> str:
    """A complete scan group of a smooth random field, through the real ingest."""
    import numpy as np

    from tasks.ingest.discover import ScanSpec
    from tasks.ingest.to_zarr import ingest_scan

    store = workdir / f"scan{dims}d-{size}.zarr"
    rng = np.random.default_rng(0)
    if dims == 3:
        import nibabel as nib

        axis = np.arange(size, dtype=np.float32)
        vol = (np.sin(axis[:, None, None] / 9) + np.cos(axis[None, :, None] / 13) * np.sin(axis[None, None, :] / 7))
        vol = (vol + 0.2 * rng.standard_normal(vol.shape)).astype(np.float32)
        src = workdir / f"scan{size}.nii"
        nib.save(nib.Nifti1Image(vol, np.eye(4)), src)
        spec = ScanSpec(f"scan{size}", "mri", (src,))
    else:
        import rasterio
        from rasterio.transform import from_origin

        src = workdir / f"scan{size}.tif"
        axis = np.arange(size, dtype=np.float32)
        with rasterio.open(src, "w", driver="GTiff", width=size, height=size, count=channels, dtype="uint8",
                           crs="EPSG:32633", transform=from_origin(0, 0, 0.5, 0.5)) as dst:
            for b in range(channels):
                band = 120 + 60 * np.sin(axis[:, None] / (20 + 5 * b)) * np.cos(axis[None, :] / 31)
                dst.write(np.clip(band + rng.normal(0, 10, band.shape), 0, 255).astype(np.uint8), b + 1)
        spec = ScanSpec(f"scan{size}", "satellite", (src,))
    if not store.exists():
        ingest_scan(spec, str(store))
    return str(store)


def _sync(torch, device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _max_diff(a: str, b: str) -> float:
    import numpy as np
    import zarr

    pa, pb = zarr.open_array(f"{a}/prediction/probabilities", mode="r"), zarr.open_array(f"{b}/prediction/probabilities",
                                                                                          mode="r")
    worst = 0.0
    for k in range(pa.shape[0]):
        worst = max(worst, float(np.abs(pa[k].astype(np.float32) - pb[k].astype(np.float32)).max()))
    return worst


def worker(job: dict) -> dict:
    import shutil

    import numpy as np
    import torch
    import zarr
    from monai.inferers import sliding_window_inference

    from measure import proc_status, reset_peak
    from models.card import ModelCard
    from models.zoo import build
    from tasks.engine.infer import EngineConfig, infer_scan
    from tasks.engine.model_io import LoadedModel
    from tasks.engine.plan import plan_tiles
    from tasks.export.ngff import remove_prediction
    from tasks.ingest.to_zarr import COMPRESSOR

    device, name, quick = job["device"], job["model"], job["quick"]
    arch, dims, channels = MODELS[name]
    workdir = Path(job["workdir"])
    size = (48 if dims == 3 else 160) if quick else (256 if dims == 3 else 4096)
    tile = ((32,) * 3 if dims == 3 else (64, 64)) if quick else ((96,) * 3 if dims == 3 else (256, 256))
    overlap = 0.5 if dims == 3 else 0.25
    batch = job["batch"]
    torch.manual_seed(0)
    net = build(arch, dims, channels, 2).eval().to(device)
    store = _scan(workdir, dims, channels, size)
    card = ModelCard(architecture=arch, in_channels=channels, classes=["background", "foreground"], spatial_dims=dims,
                     tile=list(tile))
    out: dict = {"model": name, "device": device, "size": size, "tile": list(tile), "batch": batch}

    # bare forward over the plan's tile count
    image = zarr.open_array(f"{store}/image/0", mode="r")
    plan = plan_tiles(tuple(image.shape[1:]), tile, overlap, tuple(image.chunks[1:]), "even")
    n = plan.tile_count()
    x = torch.randn((batch, channels, *tile), device=device)

    def bare_forward() -> float:
        with torch.inference_mode():
            _sync(torch, device)
            t0 = time.perf_counter()
            for start in range(0, n, batch):
                net(x[: min(batch, n - start)])
            _sync(torch, device)
        return time.perf_counter() - t0

    with torch.inference_mode():
        net(x)  # warm-up: kernels chosen, memory pools filled
    bare = bare_forward()
    out.update(tiles=n, bare_seconds=bare, bare_tiles_per_s=n / bare)

    def tilewise(target: str, amp: str) -> tuple[float, object]:
        remove_prediction(target)
        cfg = EngineConfig(tile=tile, overlap=overlap, batch=batch, device=device, amp=amp)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        res = infer_scan(target, LoadedModel(net, card, f"bench:{name}-seed0"), cfg)
        _sync(torch, device)
        return time.perf_counter() - t0, res

    base_rss = proc_status("VmRSS")
    reset_peak()
    seconds, res = tilewise(store, "none")
    out["peak_device_mb"] = (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda")
                             else (proc_status("VmHWM") - base_rss) / 2**20)
    # --repeats: more bare / tilewise pairs, alternating which goes first; medians count (a shared
    # machine's speed drifts by tens of percent within minutes)
    bares, tilewises = [bare], [seconds]
    for r in range(1, job.get("repeats", 1)):
        for step in (("tilewise", "bare") if r % 2 else ("bare", "tilewise")):
            if step == "bare":
                bares.append(bare_forward())
            else:
                tilewises.append(tilewise(store, "none")[0])
    bare, seconds = statistics.median(bares), statistics.median(tilewises)
    out.update(bare_runs=bares, tilewise_runs=tilewises, bare_seconds=bare, bare_tiles_per_s=n / bare,
               tilewise_seconds=seconds, engine_tiles=res.tiles, bare_over_tilewise=bare / seconds)
    for amp in ("bf16", "fp16") if device.startswith("cuda") else ("bf16",):
        other = workdir / f"{Path(store).stem}-{amp}.zarr"
        shutil.rmtree(other, ignore_errors=True)
        shutil.copytree(store, other, ignore=shutil.ignore_patterns("prediction", "labels"))
        secs, _ = tilewise(str(other), amp)
        out[f"{amp}_seconds"] = secs
        out[f"{amp}_max_dp"] = _max_diff(store, str(other))
        shutil.rmtree(other, ignore_errors=True)

    # MONAI's in-memory pipeline on the same device
    t0 = time.perf_counter()
    xs = torch.from_numpy(np.asarray(image[...], dtype=np.float32))[None].to(device)
    with torch.inference_mode():
        logits = sliding_window_inference(xs, tile, batch, net, overlap=overlap, mode="gaussian")
        probs = torch.softmax(logits, 1)[0]
        labels = probs.argmax(0).to(torch.uint8).cpu().numpy()
        probs = probs.to(torch.float16).cpu().numpy()
    mdir = Path(tempfile.mkdtemp(dir=workdir))
    chunks = tuple(image.chunks[1:])
    p = zarr.create_array(store=str(mdir / "p"), shape=probs.shape, dtype="float16", chunks=(1, *chunks),
                          compressors=COMPRESSOR, fill_value=0, zarr_format=3)
    p[...] = probs
    lab = zarr.create_array(store=str(mdir / "l"), shape=labels.shape, dtype="uint8", chunks=chunks,
                            compressors=COMPRESSOR, fill_value=0, zarr_format=3)
    lab[...] = labels
    out["monai_seconds"] = time.perf_counter() - t0
    out["monai_over_tilewise"] = out["monai_seconds"] / out["tilewise_seconds"]
    shutil.rmtree(mdir, ignore_errors=True)
    return out


def run_worker(job: dict, timeout: float) -> dict:
    return measure.run_worker(__file__, job, timeout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if present)")
    ap.add_argument("--quick", action="store_true", help="tiny scans and tiles: checks the script runs")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1,
                    help="bare / tilewise float32 pairs per model, alternating which goes first; medians count")
    ap.add_argument("--json", action="store_true", help="one JSON line per model instead of the table")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(measure.RESULT_MARK + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    device = args.device
    if device is None:
        import torch  # the driver needs it only to pick the device

        device = "cuda" if torch.cuda.is_available() else "cpu"
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        print(f"error: unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}", file=sys.stderr)
        return 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="tilewise-gpu-", dir=args.workdir) as tmp:
        for name in names:
            _say(f"{name} on {device} ...")
            repeats = max(args.repeats, 1)
            rows.append(run_worker({"model": name, "device": device, "quick": args.quick, "batch": args.batch,
                                    "workdir": tmp, "repeats": repeats}, timeout=900 * repeats))
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    mem = "peak GPU MB" if device.startswith("cuda") else "peak RSS MB"
    print(f"{'model':8s} {'tiles':>6s} {'bare tiles/s':>12s} {'tilewise s':>10s} {'bare/tw':>8s} {'MONAI/tw':>8s} "
          f"{'bf16 s':>7s} {'bf16 |dp|':>9s} {'fp16 s':>7s} {'fp16 |dp|':>9s} {mem:>11s}")
    for r in rows:
        fp16 = (f"{r['fp16_seconds']:7.2f} {r['fp16_max_dp']:9.2e}" if "fp16_seconds" in r else f"{'-':>7s} {'-':>9s}")
        print(f"{r['model']:8s} {r['tiles']:6d} {r['bare_tiles_per_s']:12.1f} {r['tilewise_seconds']:10.2f} "
              f"{r['bare_over_tilewise']:8.2f} {r['monai_over_tilewise']:8.2f} {r['bf16_seconds']:7.2f} "
              f"{r['bf16_max_dp']:9.2e} {fp16} {r['peak_device_mb']:11.0f}")
    print(f"device: {device}; scans: " + ", ".join(f"{r['model']} {r['size']}^{3 if len(r['tile']) == 3 else 2}"
                                              for r in rows) + "; target on a GPU: bare ÷ tilewise ≥ 0.8")
    if args.repeats > 1:
        for r in rows:
            print(f"{r['model']}: medians of {len(r['tilewise_runs'])} runs; bare s "
                  + " ".join(f"{v:.2f}" for v in r["bare_runs"]) + ", tilewise s "
                  + " ".join(f"{v:.2f}" for v in r["tilewise_runs"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

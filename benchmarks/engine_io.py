#!/usr/bin/env python
"""Benchmark: the engine's own work against the I/O limit and MONAI, with a trivial network.

    .venv/bin/python benchmarks/engine_io.py [--cases 2d,3d] [--size2d 16384] [--size3d 512]
                                             [--quick] [--outputs labels] [--profile]
                                             [--repeats N] [--json]

On a GPU the network is nearly free; what is left is the pipeline's own work. The network here
is ``cat([x, -x])`` (two "logits" per voxel, a copy), so every run's time is its pipeline alone.
Each measurement runs in its own fresh process (imports, then the timer):

* ``tilewise``: ``infer_scan`` with the engine's defaults, what a user gets: probabilities
  (float16), labels, the NGFF label pyramid (``labels/prediction``), done marks, completion.
* ``io``: the I/O limit. A plain chunk-by-chunk read of the input (every chunk decoded once),
  plus a plain chunk-by-chunk write of the same output bytes: every array the tilewise run wrote,
  same shapes, chunks, dtypes and codecs, the same values (read back from the tilewise output
  outside the timer, chunk by chunk).
* ``io`` again with each chunk encoded / decoded in the calling thread and stored with the store's
  synchronous calls (``tasks.chunk_io``, what the engine does on a local store), not through
  zarr's event loop: printed beside the plain one, so the engine's gain from that path is not
  counted as its own.
* ``monai``: MONAI's in-memory pipeline: the whole image read from Zarr into memory,
  ``sliding_window_inference`` (same tile, overlap, Gaussian blending, 4 tiles per call), softmax,
  then float16 probabilities and uint8 labels written to Zarr with the same chunks and codec.

Cases: ``2d``: a 3-band uint8 GeoTIFF of n² (ingested as ``satellite``, chunks 512²), 256² tiles,
overlap 0.25. ``3d``: a smooth float32 n³ volume (``benchmarks/engine.py``'s, ingested as ``mri``,
chunks 32×64×64), 96³ tiles, overlap 0.5 (each voxel blended 8 times). Inputs are built once and
cached under ``--workdir``. Printed: seconds, MB/s read and written, tilewise ÷ I/O limit (targets
2D ≤ 1.5, 3D ≤ 2.5), tilewise ÷ MONAI (target ≤ 0.8), working memory (peak RSS above the
worker's RSS after imports), input chunks decoded ÷ the distinct chunks the tiles need (aim
≤ 1.1; 1.00 when each is decoded once), and each side's CPU seconds over all threads, user +
system (``getrusage``): on two cores, a side that needs more CPU than the other cannot hide it.

``--repeats N``: tilewise and the I/O limit run in turns, N times each, and their medians count
(a shared machine's speed drifts by tens of percent within minutes); each pair's ratio is printed.
``--json``: one line per case.

``--profile``: the tilewise run under cProfile; the top functions by cumulative and own time go
to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure  # noqa: E402
MB = 1e6
GEN_VERSION = 1

CASES = {"2d": {"tile": [256, 256], "overlap": 0.25}, "3d": {"tile": [96, 96, 96], "overlap": 0.5}}


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# inputs (build workers)


def build_2d(job: dict) -> dict:
    """A 3-band uint8 GeoTIFF of n², tiled 512², DEFLATE: smooth structure plus noise, ingested."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    from tasks.ingest.discover import ScanSpec
    from tasks.ingest.to_zarr import ingest_scan

    n, tif, store = job["size"], Path(job["tif"]), job["store"]
    rng = np.random.default_rng(0)
    profile = {"driver": "GTiff", "width": n, "height": n, "count": 3, "dtype": "uint8", "tiled": True,
               "blockxsize": 512, "blockysize": 512, "compress": "deflate", "crs": "EPSG:32633",
               "transform": from_origin(500000, 4000000, 0.5, 0.5)}
    x = np.arange(n, dtype=np.float32)[None, :]
    with rasterio.open(tif, "w", **profile) as dst:
        for y0 in range(0, n, 512):
            y = np.arange(y0, min(y0 + 512, n), dtype=np.float32)[:, None]
            for b in range(3):
                base = 110 + 50 * np.sin(x / (40 + 13 * b)) * np.cos(y / (57 + 7 * b)) + 30 * np.sin((x + y) / 301)
                noise = rng.normal(0, 12, size=base.shape)
                band = np.clip(base + noise, 0, 255).astype(np.uint8)
                dst.write(band, b + 1, window=rasterio.windows.Window(0, y0, n, band.shape[0]))
    res = ingest_scan(ScanSpec(scan_id=f"raster{n}", modality="satellite", sources=(tif,)), store, force=True)
    return {"size": n, "shape": list(res.shape)}


def build_3d(job: dict) -> dict:
    from engine import build_input

    return build_input({"size": job["size"], "nii": job["tif"], "store": job["store"]})


# --------------------------------------------------------------------------------------------
# measured workers


def _trivial():
    import torch

    class Trivial(torch.nn.Module):
        def forward(self, x):  # two 'logits' per voxel from the first channel: a copy, no network
            return torch.cat([x[:, :1], -x[:, :1]], 1)

    return Trivial().eval()


def _measure(job: dict, run) -> dict:
    import gc

    import numpy  # noqa: F401
    import torch
    import zarr  # noqa: F401
    from monai.inferers import sliding_window_inference  # noqa: F401

    import tasks.engine.infer  # noqa: F401
    from measure import maxrss, proc_status, reset_peak

    torch.set_num_threads(int(job.get("threads") or torch.get_num_threads()))
    gc.collect()
    base = proc_status("VmRSS")
    reset_peak()
    import resource

    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    detail = run()
    seconds = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    user, system = ru1.ru_utime - ru0.ru_utime, ru1.ru_stime - ru0.ru_stime
    peak = proc_status("VmHWM") or maxrss()
    return {"mode": job["mode"], "case": job["case"], "seconds": seconds, "cpu_seconds": user + system,
            "user_s": user, "system_s": system, "working": peak - base, "detail": detail}


def _output_arrays(store: str) -> list[str]:
    """Every array a tilewise run writes, relative to the scan group."""
    import zarr

    group = zarr.open_group(store, mode="r")
    names = ["prediction/probabilities", "prediction/labels"]
    if "labels" in group and "prediction" in group["labels"]:
        names += [f"labels/prediction/{k}" for k, _ in sorted(group["labels/prediction"].arrays())]
    return names


def _set_aside(path: str | Path, job: dict) -> None:
    """Move ``path`` into the job's trash folder, removed when the benchmark ends: deleting
    thousands of chunk files makes ext4 skip the inodes it just freed when the next run creates
    its files (seconds per run in a kernel profile), a cost of the benchmark's own clean-up that
    would land on whichever run came next. Its pages are written back and dropped from the page
    cache (``measure.settle``), so every run starts with the same free memory."""
    import uuid

    path = Path(path)
    if path.exists():
        trash = Path(job["trash"])
        trash.mkdir(parents=True, exist_ok=True)
        aside = trash / uuid.uuid4().hex
        path.rename(aside)
        measure.settle(aside)


def run_tilewise(job: dict) -> dict:
    from tasks.engine.infer import EngineConfig, infer_scan
    from tasks.engine.model_io import LoadedModel, ModelCard
    from tasks.export.ngff import remove_prediction

    store = job["store"]
    for old in ("prediction", "labels/prediction", "labels/instances"):
        _set_aside(f"{store}/{old}", job)
    remove_prediction(store)  # outside the timer: every run starts from no prediction (and none listed)
    extra = {"outputs": job["outputs"]} if job.get("outputs") else {}
    cfg = EngineConfig(tile=tuple(job["tile"]), overlap=job["overlap"], device=job.get("device", "cpu"), **extra)
    model = LoadedModel(_trivial(), ModelCard(), "bench:trivial")

    def run():
        if job.get("profile"):
            import cProfile
            import pstats

            prof = cProfile.Profile()
            res = prof.runcall(infer_scan, store, model, cfg)
            stats = pstats.Stats(prof, stream=sys.stderr)
            stats.sort_stats("cumulative").print_stats(35)
            stats.sort_stats("tottime").print_stats(25)
        else:
            res = infer_scan(store, model, cfg)
        return {"status": res.status, "tiles": res.tiles, "chunks": res.chunks_written,
                "decoded_ratio": res.input_chunks_decoded / max(res.input_chunks_needed, 1)}

    out = _measure(job, run)
    import zarr

    out["detail"]["arrays"] = _output_arrays(store)
    out["detail"]["written_bytes"] = sum(zarr.open_array(f"{store}/{a}", mode="r").nbytes
                                         for a in out["detail"]["arrays"])
    return out


def _chunk_boxes(shape, chunks):
    import itertools

    grid = [range(0, n, c) for n, c in zip(shape, chunks)]
    for starts in itertools.product(*grid):
        yield tuple(slice(s, min(s + c, n)) for s, c, n in zip(starts, chunks, shape))


def run_io(job: dict) -> dict:
    import zarr

    store, scratch = job["store"], Path(job["scratch"])
    _set_aside(scratch, job)
    arrays = _output_arrays(store)
    sources = {a: zarr.open_array(f"{store}/{a}", mode="r") for a in arrays}
    targets = {}
    for a, src in sources.items():  # same shapes, chunks, dtypes, codecs
        targets[a] = zarr.create_array(store=str(scratch / a.replace("/", "_")), shape=src.shape, dtype=src.dtype,
                                       chunks=src.chunks, compressors=src.compressors, filters=src.filters,
                                       fill_value=src.fill_value, zarr_format=3)

    direct = bool(job.get("direct"))
    if direct:  # each chunk encoded / decoded in this thread (tasks.chunk_io), as the engine does
        from tasks.chunk_io import ChunkCodec

        codecs = {a: ChunkCodec.for_array(t) for a, t in targets.items()}

    def run():
        image = zarr.open_array(f"{store}/image/0", mode="r")
        reader = ChunkCodec.for_array(image) if direct else None
        t_read = time.perf_counter()
        for box in _chunk_boxes(image.shape, image.chunks):
            if reader is not None:
                reader.read(tuple(b.start // c for b, c in zip(box, image.chunks)))
            else:
                image[box]
        t_read = time.perf_counter() - t_read
        t_write = 0.0
        for a, src in sources.items():
            dst = targets[a]
            codec = codecs.get(a) if direct else None
            for box in _chunk_boxes(src.shape, src.chunks):
                data = src[box]  # outside the write's timer: the same values the engine wrote
                t = time.perf_counter()
                if codec is not None:
                    codec.write(tuple(b.start // c for b, c in zip(box, src.chunks)), data)
                else:
                    dst[box] = data
                t_write += time.perf_counter() - t
        return {"read_seconds": t_read, "write_seconds": t_write, "read_bytes": image.nbytes,
                "written_bytes": sum(s.nbytes for s in sources.values())}

    out = _measure(job, run)
    d = out["detail"]
    out["seconds"] = d["read_seconds"] + d["write_seconds"]  # the source reads for the writes excluded
    _set_aside(scratch, job)
    return out


def run_monai(job: dict) -> dict:
    import numpy as np
    import torch
    import zarr
    from monai.inferers import sliding_window_inference

    from tasks.ingest.to_zarr import COMPRESSOR

    out_dir = Path(job["scratch"])
    _set_aside(out_dir, job)
    model = _trivial()

    def run():
        image = zarr.open_array(f"{job['store']}/image/0", mode="r")
        chunks = tuple(image.chunks[1:])
        x = torch.from_numpy(np.asarray(image[...], dtype=np.float32))[None]
        with torch.inference_mode():
            logits = sliding_window_inference(x, tuple(job["tile"]), 4, model, overlap=job["overlap"], mode="gaussian")
            del x
            probs = torch.softmax(logits, dim=1)[0]
            del logits
            labels = probs.argmax(0).to(torch.uint8).numpy()
            probs = probs.to(torch.float16).numpy()
        p = zarr.create_array(store=str(out_dir / "probabilities"), shape=probs.shape, dtype="float16",
                              chunks=(1, *chunks), compressors=COMPRESSOR, fill_value=0, zarr_format=3)
        p[...] = probs
        lab = zarr.create_array(store=str(out_dir / "labels"), shape=labels.shape, dtype="uint8", chunks=chunks,
                                compressors=COMPRESSOR, fill_value=0, zarr_format=3)
        lab[...] = labels
        return {"shape": list(probs.shape)}

    out = _measure(job, run)
    _set_aside(out_dir, job)
    return out


WORKERS = {"build2d": build_2d, "build3d": build_3d, "tilewise": run_tilewise, "io": run_io, "monai": run_monai}


# --------------------------------------------------------------------------------------------
# driver: imports nothing heavy


def run_worker(job: dict, timeout: float = 7200) -> dict:
    return measure.run_worker(__file__, job, timeout)


def ensure_input(workdir: Path, case: str, size: int) -> str:
    inputs = workdir / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    store = inputs / f"{case}-{size}.zarr"
    marker = inputs / f"{case}-{size}.json"
    if store.exists() and marker.exists() and json.loads(marker.read_text()).get("gen") == GEN_VERSION:
        return str(store)
    _say(f"{case} {size}: building the input ...")
    src = inputs / (f"{case}-{size}.tif" if case == "2d" else f"{case}-{size}.nii")
    t0 = time.perf_counter()
    run_worker({"mode": f"build{case}", "size": size, "tif": str(src), "store": str(store)})
    src.unlink(missing_ok=True)
    marker.write_text(json.dumps({"gen": GEN_VERSION, "seconds": time.perf_counter() - t0}))
    return str(store)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="2d,3d")
    ap.add_argument("--size2d", type=int, default=16384)
    ap.add_argument("--size3d", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="2D 2048², 3D 192³")
    ap.add_argument("--outputs", default=None, choices=("labels,probabilities", "labels"), help="the engine's --outputs")
    ap.add_argument("--no-monai", dest="monai", action="store_false")
    ap.add_argument("--profile", action="store_true", help="cProfile the tilewise run (stderr)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=1,
                    help="tilewise and I/O-limit runs in turns, N each; their medians count")
    ap.add_argument("--json", action="store_true", help="one JSON line per case instead of the table")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/tilewise-engine-io"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        import tasks.codecs  # noqa: F401  (every side reads and writes through the same codec pipeline)

        job = json.loads(args.worker)
        print(measure.RESULT_MARK + json.dumps(WORKERS[job["mode"]](job)), flush=True)
        return 0
    if args.quick:
        args.size2d, args.size3d = 2048, 192
    trash = args.workdir / "trash"  # what the runs set aside (see _set_aside), removed at the end
    shutil.rmtree(trash, ignore_errors=True)
    try:
        rows = _run_cases(args, trash)
    finally:
        shutil.rmtree(trash, ignore_errors=True)
    if args.json:
        for row in _json_rows(rows):
            print(json.dumps(row))
        return 0
    _print_table(rows)
    return 0


def _run_cases(args, trash: Path) -> list:
    rows = []
    for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
        size = args.size2d if case == "2d" else args.size3d
        store = ensure_input(args.workdir, case, size)
        job = {"case": case, "store": store, "threads": args.threads, **CASES[case],
               "scratch": str(args.workdir / "scratch"), "trash": str(trash)}
        tws, ios = [], []
        for _ in range(args.repeats):  # tilewise and the I/O limit in turns: the machine's speed drifts
            tw = run_worker({**job, "mode": "tilewise", "outputs": args.outputs, "profile": args.profile})
            _say(f"{case} {size}: tilewise {tw['seconds']:.1f} s (CPU {tw['cpu_seconds']:.1f} s)")
            io = run_worker({**job, "mode": "io"})
            _say(f"{case} {size}: I/O limit {io['seconds']:.1f} s (read {io['detail']['read_seconds']:.1f} s, "
                 f"write {io['detail']['write_seconds']:.1f} s; CPU of the whole worker run {io['cpu_seconds']:.1f} s)")
            tws.append(tw)
            ios.append(io)
        tw, io = _median_run(tws), _median_run(ios)
        tw["runs"], io["runs"] = [r["seconds"] for r in tws], [r["seconds"] for r in ios]
        iod = run_worker({**job, "mode": "io", "direct": True})
        _say(f"{case} {size}: I/O limit, chunks coded in the calling thread {iod['seconds']:.1f} s "
             f"(read {iod['detail']['read_seconds']:.1f} s, write {iod['detail']['write_seconds']:.1f} s)")
        io["direct"] = iod
        mo = run_worker({**job, "mode": "monai"}) if args.monai else None
        if mo:
            _say(f"{case} {size}: MONAI {mo['seconds']:.1f} s")
        rows.append((case, size, tw, io, mo))
    return rows


def _median_run(runs: list[dict]) -> dict:
    """The run of median time (the lower middle one of an even count), with the median seconds."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    out = dict(ordered[(len(ordered) - 1) // 2])
    out["seconds"] = statistics.median(r["seconds"] for r in runs)
    return out


def _json_rows(rows: list) -> list[dict]:
    out = []
    for case, size, tw, io, mo in rows:
        d = io["detail"]
        out.append({
            "case": case, "size": size, "tilewise_seconds": tw["seconds"], "io_seconds": io["seconds"],
            "tilewise_runs": tw["runs"], "io_runs": io["runs"],
            "tilewise_over_io": tw["seconds"] / io["seconds"],
            "io_direct_seconds": io["direct"]["seconds"],
            "monai_seconds": mo["seconds"] if mo else None,
            "tilewise_over_monai": tw["seconds"] / mo["seconds"] if mo else None,
            "read_bytes": d["read_bytes"], "written_bytes": tw["detail"]["written_bytes"],
            "io_written_bytes": d["written_bytes"], "arrays": tw["detail"]["arrays"],
            "working_bytes": tw["working"], "decoded_ratio": tw["detail"].get("decoded_ratio"),
            "cpu": {name: {"user_s": r["user_s"], "system_s": r["system_s"]}
                    for name, r in (("tilewise", tw), ("io", io), ("monai", mo)) if r},
        })
    return out


def _print_table(rows: list) -> None:
    pipeline = os.environ.get("TILEWISE_ZARR_PIPELINE", "zarrs (default)")
    print(f"\n{'case':10s} {'tilewise s':>10s} {'I/O s':>8s} {'MONAI s':>8s} {'tw/I/O':>7s} {'target':>7s} "
          f"{'tw/MONAI':>8s} {'read MB/s':>9s} {'written MB/s':>12s} {'working MB':>10s} {'decoded/needed':>14s}")
    for case, size, tw, io, mo in rows:
        d = io["detail"]
        name = f"{case} {size}"
        ratio = tw["seconds"] / io["seconds"]
        target = 1.5 if case == "2d" else 2.5
        mono = f"{tw['seconds'] / mo['seconds']:8.2f}" if mo else f"{'-':>8s}"
        print(f"{name:10s} {tw['seconds']:10.1f} {io['seconds']:8.1f} {mo['seconds'] if mo else float('nan'):8.1f} "
              f"{ratio:7.2f} {'≤ ' + str(target):>7s} {mono} {d['read_bytes'] / MB / tw['seconds']:9.0f} "
              f"{tw['detail']['written_bytes'] / MB / tw['seconds']:12.0f} "
              f"{tw['working'] / MB:10.0f} {tw['detail'].get('decoded_ratio', float('nan')):14.2f}")
        print(f"{'':10s} I/O limit: read {d['read_bytes'] / MB / d['read_seconds']:.0f} MB/s, write "
              f"{d['written_bytes'] / MB / max(d['write_seconds'], 1e-9):.0f} MB/s; arrays: "
              f"{', '.join(tw['detail']['arrays'])}")
        if len(tw.get("runs", [])) > 1:
            pairs = ", ".join(f"{t / i:.2f}" for t, i in zip(tw["runs"], io["runs"]))
            print(f"{'':10s} medians of {len(tw['runs'])} alternating runs each; tilewise ÷ I/O per pair: {pairs}")
        cpu = ", ".join(f"{label} {r['user_s']:.1f} + {r['system_s']:.1f}"
                        for label, r in (("tilewise", tw), ("I/O limit", io), ("MONAI", mo)) if r)
        print(f"{'':10s} CPU-s over all threads, user + system (of the median run): {cpu}")
        dd = io["direct"]
        print(f"{'':10s} I/O limit with each chunk coded in the calling thread (tasks.chunk_io, as the engine "
              f"does): {dd['seconds']:.1f} s, tilewise ÷ it {tw['seconds'] / dd['seconds']:.2f}")
    print(f"codec pipeline (TILEWISE_ZARR_PIPELINE): {pipeline}; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Benchmark: tilewise ``infer_scan`` vs. MONAI ``sliding_window_inference`` on a CPU.

    .venv/bin/python benchmarks/engine.py [--sizes 256,512] [--quick] [--repeats 2]
                                          [--workdir DIR] [--threads N] [--explore]

Setup (both sides): MONAI ``UNet(spatial_dims=3, in_channels=1, out_channels=2,
channels=(16, 32, 64, 128), strides=(2, 2, 2))`` with MONAI's defaults for everything else
(``num_res_units=0``, ``kernel_size=3``, PReLU, instance norm), random weights from
``torch.manual_seed(0)``, eval mode, CPU, tiles of 96³, overlap 0.5, Gaussian blending
(sigma = 0.125 x tile), **4 tiles per model call on both sides** (``sw_batch_size=4`` /
``EngineConfig(batch=4)``).

Inputs: a smooth random float32 volume (a sum of 16 random low-frequency plane waves,
wavelengths 24..160 voxels) of n³ voxels per size, written as a plain ``.nii`` (i, j, k) and
ingested with ``tasks.ingest.to_zarr.ingest_scan`` (modality ``mri``: chunks 64³, Blosc-zstd).
Built once per size and cached under ``--workdir`` (default /tmp/tilewise-engine-bench).

Measured, each run in a fresh subprocess (hidden ``--worker`` mode):

* ``monai``:    read the Zarr image fully into memory -> ``sliding_window_inference(x, (96,)*3, 4,
                model, overlap=0.5, mode="gaussian")`` under ``torch.inference_mode`` -> softmax ->
                write a float32 Zarr array, chunks (1, 64, 64, 64), same codec as the engine's output.
* ``tilewise``: ``infer_scan(store, LoadedModel(model, ModelCard(), id), EngineConfig(...))`` with
                (a) MONAI's placement and padding, float32 output (``placement='monai',
                pad='constant', output_dtype='float32'``): the same tiles as MONAI, comparable
                voxel for voxel; (b) the engine's defaults (``placement='even', pad='reflect'``,
                float16 output), at the smallest size only. The engine also writes the argmax
                labels and the done marks; with an empty model card it runs one probe tile to
                learn the number of classes (both included in its time).
* ``bare``:     the model alone: as many tiles as the engine's plan (``plan_tiles``), in calls of 4,
                on random input of the tile shape, under ``torch.inference_mode``; no I/O, no
                blending.
* diagnostics:  MONAI and tilewise once more with a trivial model (``cat([x, -x])``, no network
                cost: what is left is each pipeline's own overhead), and at the largest size one
                tilewise run with glibc's mmap threshold toggled: where the engine pins it at 1 MiB
                (``tasks.memory.return_large_buffers_to_the_system``) the benchmark disables the pin
                in that one worker; where it does not, the worker pins it itself. Shows the time and
                memory trade of the pin (1 MiB: every large buffer is a fresh mapping, returned on
                free, paid for in page faults). Neither counts towards the targets.

Memory: every worker imports the same modules (torch, monai, zarr, tilewise engine), builds the
model, records VmRSS (/proc/self/status) as its baseline and resets the kernel's peak-RSS mark
(/proc/self/clear_refs); working memory = ``getrusage(RUSAGE_SELF).ru_maxrss`` after the run minus
that baseline. The driver itself imports nothing heavy: with vfork+exec a child's ru_maxrss
starts at the parent's peak, so a fat driver would leak into every measurement.

Timing: at the smallest size the runs are repeated ``--repeats`` times in alternating order and
the best (minimum) time counts; larger sizes run once. The machine may be shared: the load
average is printed at start and end.

``--explore`` measures cheap speed-ups instead of the table (no engine code changes): threads,
channels-last input, batch size, bf16 autocast, on the bare model and through ``infer_scan`` at
the smallest size, each with its max abs difference from MONAI's output.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT_MARK = "BENCH_RESULT "
GEN_VERSION = 1  # bump when the input generator changes: cached inputs are rebuilt
MIB = 1 << 20

UNET_KW = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": (16, 32, 64, 128), "strides": (2, 2, 2)}
MONAI_CFG = {"placement": "monai", "pad": "constant", "output_dtype": "float32"}
DEFAULT_CFG: dict = {}  # the engine's own defaults: placement even, pad reflect, float16 output


# --------------------------------------------------------------------------------------------
# memory helpers (worker side)
from measure import load_average, maxrss as _maxrss, proc_status as _vm, reset_peak as _reset_peak  # noqa: E402


def _say(msg: str) -> None:
    print(f"    [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class _Progress:
    """Progress lines to stderr, at most every 10 % or 60 s."""

    def __init__(self, label: str):
        self.label, self.t0, self.last_t, self.last_frac = label, time.perf_counter(), 0.0, 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter() - self.t0
        frac = done / max(total, 1)
        if done == total or frac - self.last_frac >= 0.1 or now - self.last_t >= 60:
            self.last_t, self.last_frac = now, frac
            rate = done / now if now > 0 else 0.0
            _say(f"{self.label}: {done}/{total} tiles, {now:6.1f} s ({rate:.2f} tiles/s)")


# --------------------------------------------------------------------------------------------
# input generation (build worker)


def _smooth_volume_slab(k0: int, k1: int, n: int, waves):
    """Voxels k0:k1 of the n³ volume as a C-ordered (k, j, i) float32 array (NIfTI's file order)."""
    import numpy as np

    f32 = np.float32
    k = np.arange(k0, k1, dtype=f32)[:, None, None]
    j = np.arange(n, dtype=f32)[None, :, None]
    i = np.arange(n, dtype=f32)[None, None, :]
    out = np.zeros((k1 - k0, n, n), dtype=f32)
    for (wi, wj, wk), phase, amp in waves:
        arg = f32(wk) * k + f32(wj) * j + (f32(wi) * i + f32(phase))
        out += f32(amp) * np.sin(arg, dtype=f32)
    return out


def smooth_waves() -> list:
    """The 16 random plane waves of the synthetic volumes (the same at every size: same structure per voxel)."""
    import numpy as np

    rng = np.random.default_rng(20240601)
    waves = []
    for _ in range(16):
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        wavelength = rng.uniform(24.0, 160.0)
        waves.append((tuple(direction * 2 * np.pi / wavelength), rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 1.5) / 4))
    return waves


def build_input(job: dict) -> dict:
    """A smooth random n³ float32 volume: plain .nii, then ingested into a scan group."""
    import nibabel as nib
    import numpy as np

    from tasks.ingest.discover import ScanSpec
    from tasks.ingest.to_zarr import ingest_scan

    n, nii, store = job["size"], Path(job["nii"]), job["store"]
    waves = smooth_waves()
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((n, n, n))
    hdr.set_data_dtype(np.float32)
    hdr.set_zooms((1.0, 1.0, 1.0))
    hdr.set_xyzt_units("mm", "sec")
    hdr.set_qform(np.eye(4), 1)
    hdr.set_sform(np.eye(4), 1)
    hdr.set_slope_inter(1.0, 0.0)
    hdr["vox_offset"] = 352
    tmp = nii.with_name(nii.name + ".part")
    t0 = time.perf_counter()
    with open(tmp, "wb") as f:
        hdr.write_to(f)
        f.write(b"\0" * (352 - f.tell()))
        f.writelines(_smooth_volume_slab(k0, min(k0 + 32, n), n, waves).tobytes() for k0 in range(0, n, 32))
    tmp.rename(nii)
    t_nii = time.perf_counter() - t0
    res = ingest_scan(ScanSpec(scan_id=f"synthetic{n}", modality="mri", sources=(nii,)), store, force=True)
    return {"size": n, "shape": list(res.shape), "nii_seconds": t_nii, "ingest_seconds": res.seconds}


# --------------------------------------------------------------------------------------------
# workers: imports, model, baseline, run


def _setup(job: dict):
    """Same imports and model on every side; returns (torch, model, import+build seconds)."""
    t0 = time.perf_counter()
    import numpy  # noqa: F401
    import torch
    import zarr  # noqa: F401
    from monai.inferers import sliding_window_inference  # noqa: F401
    from monai.networks.nets import UNet

    import tasks.engine.infer
    import tasks.engine.plan  # noqa: F401

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    torch.manual_seed(0)
    model = UNet(**UNET_KW).eval()
    if job.get("model") == "trivial":  # near-zero cost: what is left is the pipeline's own overhead
        model = _Trivial().eval()
    return torch, model, time.perf_counter() - t0


def _trivial_cls():
    import torch

    class Trivial(torch.nn.Module):
        """Two 'logits' per voxel, (x, -x): costs a copy, so a run's time is its pipeline overhead."""

        def forward(self, x):
            return torch.cat([x, -x], 1)

    return Trivial


def _Trivial():
    return _trivial_cls()()


def _measure(job: dict, run) -> dict:
    import gc

    torch, model, setup_s = _setup(job)
    gc.collect()
    baseline = _vm("VmRSS")
    peak_reset = _reset_peak()
    peak_before = _maxrss()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    detail = run(torch, model)
    seconds = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    peak = _maxrss()
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return {"mode": job["mode"], "label": job.get("label", job["mode"]), "size": job.get("size"),
            "seconds": seconds, "cpu_seconds": cpu, "baseline_rss": baseline, "peak_rss": peak, "peak_before": peak_before,
            "peak_reset": peak_reset, "vm_hwm": _vm("VmHWM"), "working": peak - baseline,
            "setup_seconds": setup_s, "threads": torch.get_num_threads(), "detail": detail}


def run_monai(job: dict) -> dict:
    def run(torch, model):
        import zarr
        from monai.inferers import sliding_window_inference

        from tasks.ingest.to_zarr import COMPRESSOR

        image = zarr.open_array(f"{job['store']}/image/0", mode="r")
        chunks = tuple(image.chunks[1:])
        x = torch.from_numpy(image[...])[None]  # (1, C, *spatial) float32 in memory
        _say(f"{job['label']}: image {tuple(x.shape)} in memory, sliding_window_inference ...")
        t_inf = time.perf_counter()
        with torch.inference_mode():
            out = sliding_window_inference(x, tuple(job["tile"]), job["batch"], model, overlap=0.5, mode="gaussian")
            probs = torch.softmax(out, dim=1)
            del out
        t_inf = time.perf_counter() - t_inf
        _say(f"{job['label']}: inference {t_inf:.1f} s, writing Zarr ...")
        arr = probs[0].numpy()
        z = zarr.create_array(store=job["out"], shape=arr.shape, dtype="float32", chunks=(1, *chunks),
                              compressors=COMPRESSOR, fill_value=0, zarr_format=3)
        z[...] = arr
        return {"inference_seconds": t_inf, "shape": list(arr.shape)}

    return _measure(job, run)


def run_tilewise(job: dict) -> dict:
    def run(torch, model):
        from tasks.engine.infer import EngineConfig, infer_scan
        from tasks.engine.model_io import LoadedModel, ModelCard

        cfg = EngineConfig(tile=tuple(job["tile"]), overlap=0.5, blend="gaussian", batch=job["batch"],
                           device="cpu", **job["config"])
        loaded = LoadedModel(model, ModelCard(), f"bench:{job.get('model', 'unet')}-seed0")
        malloc = _malloc_setting(job.get("malloc"))
        res = infer_scan(job["store"], loaded, cfg, progress=_Progress(job["label"]))
        return {"status": res.status, "tiles": res.tiles, "model_calls": res.model_calls,
                "chunks_written": res.chunks_written, "spills": res.spills,
                "peak_accumulator_mb": res.peak_accumulator_mb, "config": job["config"], "malloc": malloc}

    return _measure(job, run)


def _malloc_setting(toggle: str | None) -> str:
    """What glibc's mmap threshold will be in this tilewise run; with ``toggle``, the opposite of
    what the engine does by itself (its pin disabled, or a pin the engine does not make)."""
    import ctypes

    from tasks.engine import infer

    pins = hasattr(infer, "return_large_buffers_to_the_system")
    if toggle == "unpin":  # --unpin: every tilewise run without the engine's pin
        if pins:
            infer.return_large_buffers_to_the_system = lambda *a, **k: False
            return "the engine's 1 MiB mmap-threshold pin disabled (--unpin)"
        return "glibc default (dynamic mmap threshold)"
    if not toggle:
        return "engine pins mmap threshold 1 MiB" if pins else "glibc default (dynamic mmap threshold)"
    if pins:
        infer.return_large_buffers_to_the_system = lambda *a, **k: False
        return "the engine's 1 MiB mmap-threshold pin disabled"
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    return "mmap threshold pinned at 1 MiB"


def run_bare(job: dict) -> dict:
    def run(torch, model):
        import zarr

        from tasks.engine.plan import plan_tiles

        image = zarr.open_array(f"{job['store']}/image/0", mode="r")
        plan = plan_tiles(tuple(image.shape[1:]), tuple(job["tile"]), 0.5, tuple(image.chunks[1:]),
                          job.get("placement", "monai"))
        n = plan.tile_count() if not job.get("tiles") else int(job["tiles"])
        batch = job["batch"]
        sizes = [batch] * (n // batch) + ([n % batch] if n % batch else [])
        g = torch.Generator().manual_seed(1)
        x = torch.randn((batch, 1, *job["tile"]), generator=g)
        m = model
        if job.get("channels_last"):
            x = x.contiguous(memory_format=torch.channels_last_3d)
        if job.get("model_channels_last"):
            m = model.to(memory_format=torch.channels_last_3d)
        dtype = {"bf16": torch.bfloat16}.get(job.get("amp", "none"))
        prog = _Progress(job["label"])
        done = 0
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            for b in sizes:
                m(x[:b])
                done += b
                prog(done, n)
        return {"tiles": n, "calls": len(sizes)}

    return _measure(job, run)


def run_compare(job: dict) -> dict:
    """Max / mean abs difference of two (K, *spatial) probability arrays, slab by slab, and the
    fraction of voxels whose argmax differs."""
    import numpy as np
    import zarr

    a = zarr.open_array(job["a"], mode="r")
    b = zarr.open_array(job["b"], mode="r")
    if a.shape != b.shape:
        return {"error": f"shapes differ: {a.shape} vs {b.shape}"}
    step = a.chunks[1]
    max_abs, sum_abs, diff_labels, n = 0.0, 0.0, 0, 0
    for z0 in range(0, a.shape[1], step):
        pa = np.asarray(a[:, z0:z0 + step], dtype=np.float32)
        pb = np.asarray(b[:, z0:z0 + step], dtype=np.float32)
        d = np.abs(pa - pb)
        max_abs = max(max_abs, float(d.max()))
        sum_abs += float(d.sum(dtype=np.float64))
        diff_labels += int((pa.argmax(0) != pb.argmax(0)).sum())
        n += d.size
    voxels = n // a.shape[0]
    return {"max_abs": max_abs, "mean_abs": sum_abs / n, "label_diff_frac": diff_labels / voxels,
            "dtypes": [str(a.dtype), str(b.dtype)]}


def run_bf16_probe(job: dict) -> dict:
    """Max abs difference of softmax probabilities, bf16 autocast vs float32, on one batch of tiles
    cut from the real input (no blending)."""
    import numpy as np
    import zarr

    torch, model, _ = _setup(job)
    image = zarr.open_array(f"{job['store']}/image/0", mode="r")
    t = job["tile"]
    origins = [(0, 0, 0), (t[0] // 2, t[1], t[2] // 3), (t[0], t[1] // 2, 0), (t[0] // 3, 0, t[2])]
    x = torch.from_numpy(np.stack([np.asarray(image[(slice(None),) + tuple(slice(o, o + s) for o, s in zip(org, t))])
                                   for org in origins]))
    with torch.inference_mode():
        ref = torch.softmax(model(x), 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
        low = torch.softmax(low.float(), 1)
    return {"max_abs": float((ref - low).abs().max()), "mean_abs": float((ref - low).abs().mean())}


WORKERS = {"build": build_input, "monai": run_monai, "tilewise": run_tilewise, "bare": run_bare,
           "compare": run_compare, "bf16_probe": run_bf16_probe}


# --------------------------------------------------------------------------------------------
# driver (imports nothing heavy: see the module docstring)


def run_worker(job: dict, timeout: float, env: dict | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONWARNINGS", "ignore")
    # stderr is inherited: the workers' progress lines show up live
    proc = subprocess.run(cmd, check=False, cwd=str(REPO), env=env, stdout=subprocess.PIPE, text=True, timeout=timeout)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    raise RuntimeError(f"worker {job['mode']} ({job.get('label')}) failed (rc {proc.returncode}):\n"
                       f"{proc.stdout[-3000:]}")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _lscpu() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "?"
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "?")
    have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f" {f}" in flags]
    return f"{model}, {os.cpu_count()} CPUs, flags: {' '.join(have) or 'none of avx2/avx512/amx'}"


def ensure_input(workdir: Path, size: int, timeout: float) -> str:
    inputs = workdir / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    store = inputs / f"synthetic{size}.zarr"
    marker = inputs / f"synthetic{size}.json"
    want = {"size": size, "gen_version": GEN_VERSION}
    if store.exists() and marker.exists():
        info = json.loads(marker.read_text())
        if all(info.get(k) == v for k, v in want.items()):
            _log(f"input {size}³: reusing {store}")
            return str(store)
    _log(f"input {size}³: building {store} ...")
    nii = inputs / f"synthetic{size}.nii"
    info = run_worker({"mode": "build", "label": f"build {size}", "size": size, "nii": str(nii),
                       "store": str(store)}, timeout)
    nii.unlink(missing_ok=True)  # the scan group is the input; the .nii was only the way in
    info.update(want)
    marker.write_text(json.dumps(info))
    _log(f"input {size}³: .nii {info['nii_seconds']:.1f} s, ingest {info['ingest_seconds']:.1f} s")
    return str(store)


def _fmt_mb(n: float) -> str:
    return f"{n / MIB:8.0f}"


class Bench:
    """Runs workers and keeps their results; ``key`` names what a run is (see KEYS)."""

    def __init__(self, args, workdir: Path):
        self.args = args
        self.workdir = workdir
        self.outputs = workdir / "outputs"
        self.outputs.mkdir(parents=True, exist_ok=True)
        self.runs: list[dict] = []
        self.diffs: dict[tuple[int, str], dict] = {}
        self.n = 0

    def job(self, mode: str, size: int, store: str, label: str, **extra) -> dict:
        job = {"mode": mode, "size": size, "store": store, "label": label, "tile": list(self.args.tile_shape),
               "batch": self.args.batch, "threads": self.args.threads}
        if self.args.model == "trivial":  # --model trivial: every row with the near-free model
            job["model"] = "trivial"
        if mode == "tilewise" and self.args.unpin:
            job["malloc"] = "unpin"
        return {**job, **extra}

    def _record(self, r: dict, key: str) -> dict:
        r["key"] = key
        self.runs.append(r)
        d = r["detail"]
        extra = f" tiles {d['tiles']}" if "tiles" in d else ""
        _log(f"  {r['label']:34s} {r['seconds']:8.2f} s  cpu {r['cpu_seconds']:8.2f} s  working "
             f"{r['working'] / MIB:7.0f} MiB  peak {r['peak_rss'] / MIB:7.0f} MiB{extra}")
        return r

    def monai(self, size: int, store: str, key: str = "monai", keep: bool = True, **extra) -> dict:
        self.n += 1
        out = self.outputs / f"{key}-{size}-{self.n}.zarr"
        r = run_worker(self.job("monai", size, store, f"{key} {size}", out=str(out), **extra), self.args.timeout)
        if keep:
            r["out"] = str(out)
        else:
            shutil.rmtree(out, ignore_errors=True)
        return self._record(r, key)

    def tilewise(self, size: int, store: str, key: str, config: dict, keep: bool = True, env: dict | None = None,
                 **extra) -> dict:
        self.n += 1
        pred = Path(store) / "prediction"
        shutil.rmtree(pred, ignore_errors=True)  # a complete prediction would make the run a no-op
        r = run_worker(self.job("tilewise", size, store, f"{key} {size}", config=config, **extra),
                       self.args.timeout, env=env)
        if keep:
            out = self.outputs / f"{key}-{size}-{self.n}"
            shutil.rmtree(out, ignore_errors=True)
            os.rename(pred, out)
            r["out"] = str(out / "probabilities")
        else:
            shutil.rmtree(pred, ignore_errors=True)
        return self._record(r, key)

    def bare(self, size: int, store: str, key: str = "bare", **extra) -> dict:
        r = run_worker(self.job("bare", size, store, f"{key} {size}", **extra), self.args.timeout)
        return self._record(r, key)

    def compare(self, a: str, b: str) -> dict:
        return run_worker({"mode": "compare", "label": "compare", "a": a, "b": b}, self.args.timeout)


KEYS = {  # key -> row label
    "monai": "MONAI sliding_window_inference",
    "tw-monai": "tilewise (monai placement, f32 out)",
    "tw-default": "tilewise default (even, reflect, f16)",
    "bare": "bare model forward (same tiles)",
    "tw-monai-malloc": "tilewise monai-cfg, mmap-threshold pin toggled",
    "monai-trivial": "MONAI, trivial model (overhead)",
    "tw-monai-trivial": "tilewise monai-cfg, trivial model",
}


def _best(runs: list[dict], key: str, size: int) -> dict | None:
    rs = [r for r in runs if r["key"] == key and r["size"] == size]
    if not rs:
        return None
    best = dict(min(rs, key=lambda r: r["seconds"]))
    best["working"] = max(r["working"] for r in rs)
    best["peak_rss"] = max(r["peak_rss"] for r in rs)
    best["times"] = [round(r["seconds"], 1) for r in rs]
    best["cpu_seconds"] = min(r["cpu_seconds"] for r in rs)
    return best


def main_table(args, bench: Bench, sizes: list[int], stores: dict[int, str]) -> None:
    small, large = sizes[0], sizes[-1]
    for size in sizes:
        store = stores[size]
        reps = args.repeats if size == small else 1
        for rep in range(reps):
            _log(f"size {size}³, repeat {rep + 1}/{reps} (load {load_average()})")
            keep = rep == 0  # outputs of the first repeat are compared
            steps = [(bench.monai, ("monai",), {"keep": keep}),
                     (bench.tilewise, ("tw-monai", MONAI_CFG), {"keep": keep}),
                     (bench.bare, ("bare",), {"placement": "monai"})]
            if size == small:
                steps.insert(2, (bench.tilewise, ("tw-default", DEFAULT_CFG), {"keep": keep}))
            if args.trivial:
                steps += [(bench.monai, ("monai-trivial",), {"keep": False, "model": "trivial"}),
                          (bench.tilewise, ("tw-monai-trivial", MONAI_CFG), {"keep": False, "model": "trivial"})]
            if rep % 2 == 1:
                steps.reverse()
            for fn, fargs, kwargs in steps:
                fn(size, store, *fargs, **kwargs)
        if args.malloc_probe and size == large and not args.unpin:
            bench.tilewise(size, store, "tw-monai-malloc", MONAI_CFG, keep=False, malloc="toggle")
        # this size's outputs: the first MONAI output against the first of each engine config
        ref = next(r for r in bench.runs if r["key"] == "monai" and r["size"] == size and r.get("out"))
        for key in ("tw-monai", "tw-default"):
            tw = next((r for r in bench.runs if r["key"] == key and r["size"] == size and r.get("out")), None)
            if tw is not None:
                bench.diffs[(size, key)] = d = bench.compare(tw["out"], ref["out"])
                _log(f"  diff {key} vs monai at {size}³: max {d.get('max_abs')}, mean {d.get('mean_abs')}")
        for r in bench.runs:  # keep the disk tidy: this size's outputs are compared
            if r["size"] == size and r.get("out"):
                shutil.rmtree(Path(r["out"]).parent if r["mode"] == "tilewise" else r["out"], ignore_errors=True)
    print_table(args, bench, sizes)


def print_table(args, bench: Bench, sizes: list[int]) -> None:
    small, large = sizes[0], sizes[-1]
    print()
    print(f"tilewise engine benchmark — {_lscpu()}; torch threads {bench.runs[0]['threads']}; "
          f"tile {'x'.join(map(str, args.tile_shape))}, overlap 0.5, Gaussian, batch {args.batch} tiles per model "
          f"call on BOTH sides; MONAI UNet{UNET_KW['channels']} strides {UNET_KW['strides']} (MONAI defaults: "
          f"num_res_units=0), torch.manual_seed(0), CPU, float32.")
    print(f"Times: best wall-clock of the runs listed, each a fresh subprocess; cpu s = the process's user+sys CPU "
          f"time (all threads), the least seen. Working memory = peak RSS (ru_maxrss) - RSS after imports + model "
          f"(the largest seen). Load average at end: {load_average()}.")
    hdr = (f"{'run':48s} {'size':>5s} {'tiles':>6s} {'time s':>8s} {'runs (s)':>20s} {'cpu s':>8s} "
           f"{'working MiB':>11s} {'peak MiB':>9s}")
    print(hdr)
    print("-" * len(hdr))
    for size in sizes:
        for key, label in KEYS.items():
            b = _best(bench.runs, key, size)
            if b is None:
                continue
            tiles = b["detail"].get("tiles", "")
            print(f"{label:48s} {size:5d} {tiles!s:>6s} {b['seconds']:8.2f} {b['times']!s:>20s} "
                  f"{b['cpu_seconds']:8.2f} {b['working'] / MIB:11.0f} {b['peak_rss'] / MIB:9.0f}")
    print("-" * len(hdr))

    def g(key, size, field):
        b = _best(bench.runs, key, size)
        return None if b is None else b[field]

    def ratio(a, b):
        return a / b if a is not None and b else float("nan")

    rows = []

    def row(text, value, target="", ok=None):
        rows.append((text, value, target, ok))

    r1 = ratio(g("monai", small, "seconds"), g("tw-monai", small, "seconds"))
    row(f"1. MONAI time / tilewise time at {small}³ (same tiles: monai placement, f32 out)", r1, ">= 1.3", r1 >= 1.3)
    row("   same by CPU time (info)", ratio(g("monai", small, "cpu_seconds"), g("tw-monai", small, "cpu_seconds")))
    if g("tw-default", small, "seconds"):
        row(f"   MONAI time / tilewise default-config time at {small}³ (extra)",
            ratio(g("monai", small, "seconds"), g("tw-default", small, "seconds")))
    r2 = ratio(g("tw-monai", large, "working"), g("monai", large, "working"))
    row(f"2. tilewise working memory / MONAI working memory at {large}³", r2, "<= 0.25", r2 <= 0.25)
    if g("tw-monai-malloc", large, "working"):
        row(f"   same, tilewise with {g('tw-monai-malloc', large, 'detail')['malloc']} (diagnostic)",
            ratio(g("tw-monai-malloc", large, "working"), g("monai", large, "working")))
        row("   its time / the time of the run above (diagnostic)",
            ratio(g("tw-monai-malloc", large, "seconds"), g("tw-monai", large, "seconds")))
    r3 = ratio(g("tw-monai", large, "peak_rss"), g("tw-monai", small, "peak_rss"))
    row(f"3. tilewise peak RSS {large}³ / {small}³", r3, "<= 1.2", r3 <= 1.2)
    r4 = ratio(g("tw-monai", small, "seconds"), g("bare", small, "seconds"))
    row(f"4. tilewise time / bare forward time at {small}³", r4, "<= 1.10", r4 <= 1.10)
    row("   same by CPU time (info)", ratio(g("tw-monai", small, "cpu_seconds"), g("bare", small, "cpu_seconds")))
    if large != small:
        r4l = ratio(g("tw-monai", large, "seconds"), g("bare", large, "seconds"))
        row(f"   tilewise time / bare forward time at {large}³", r4l, "<= 1.10", r4l <= 1.10)
        row("   same by CPU time (info)", ratio(g("tw-monai", large, "cpu_seconds"), g("bare", large, "cpu_seconds")))
    if g("tw-default", small, "seconds"):
        row(f"   tilewise default-config time / bare forward time at {small}³ (extra)",
            ratio(g("tw-default", small, "seconds"), g("bare", small, "seconds")))
    r5 = bench.diffs.get((small, "tw-monai"), {}).get("max_abs", float("nan"))
    row(f"5. max |tilewise - MONAI| probabilities at {small}³ (monai placement, constant pad, f32)", r5,
        "< 1e-5", r5 < 1e-5)
    dd = bench.diffs.get((small, "tw-default"), {})
    if dd:
        row(f"   max |tilewise default - MONAI| at {small}³ (even placement, f16 out; info)", dd["max_abs"])
    w = max(len(r[0]) for r in rows)
    print()
    for text, value, target, ok in rows:
        flag = "" if ok is None else ("ok" if ok else "MISSED")
        print(f"{text:{w}s} {value:10.4g}  {target:>8s}  {flag}")
    print()
    for (size, key), d in sorted(bench.diffs.items()):
        print(f"{key} vs MONAI at {size}³: max abs {d['max_abs']:.3g}, mean abs {d['mean_abs']:.3g}, argmax differs at "
              f"{100 * d['label_diff_frac']:.4f} % of voxels ({d['dtypes'][0]} vs {d['dtypes'][1]})")
    for size in sizes:
        over = [(g(k, size, "seconds"), g(k, size, "cpu_seconds"), g(k, size, "working"))
                for k in ("monai-trivial", "tw-monai-trivial")]
        if all(o[0] is not None for o in over):
            print(f"pipeline overhead at {size}³ (trivial model, no network cost): MONAI {over[0][0]:.1f} s "
                  f"(cpu {over[0][1]:.1f} s, working {over[0][2] / MIB:.0f} MiB), tilewise {over[1][0]:.1f} s "
                  f"(cpu {over[1][1]:.1f} s, working {over[1][2] / MIB:.0f} MiB)")
    acc = sorted({(r["size"], round(r["detail"]["peak_accumulator_mb"]), r["detail"]["spills"]) for r in bench.runs
                  if r["key"] == "tw-monai"})
    print("tilewise accumulator peak (live chunk sums) MiB / spills: " + ", ".join(f"{s}³ {a}/{n}" for s, a, n in acc))
    settings = sorted({r["detail"].get("malloc", "?") for r in bench.runs if r["key"] == "tw-monai"})
    print(f"tilewise runs (except the toggled diagnostic): {', '.join(settings)}; MONAI and bare runs: glibc default")
    print("baseline RSS after imports + model: " + ", ".join(sorted({f"{r['baseline_rss'] / MIB:.0f}" for r in bench.runs}))
          + " MiB")
    not_reset = [r["label"] for r in bench.runs if not r["peak_reset"]]
    if not_reset:
        print(f"WARNING: peak RSS could not be reset in {not_reset}: working memory includes the import peak")


def explore(args, bench: Bench, size: int, store: str) -> None:
    """Cheap speed-ups without engine code changes, each variant in 2 interleaved rounds."""
    _log(f"explore at {size}³ (load {load_average()})")
    n_tiles = args.explore_tiles
    bare_variants = [("base (torch threads=cores, batch 4)", {}), ("threads=1", {"threads": 1}),
                     ("channels_last_3d input", {"channels_last": True}),
                     ("channels_last_3d input+model", {"channels_last": True, "model_channels_last": True}),
                     ("batch 1", {"batch": 1}), ("batch 2", {"batch": 2}), ("batch 8", {"batch": 8})]
    bare: dict[str, list] = {}
    for rnd in range(args.explore_rounds):
        for name, extra in (bare_variants if rnd % 2 == 0 else bare_variants[::-1]):
            job = bench.job("bare", size, store, f"bare {name}", tiles=n_tiles)
            job.update(extra)
            r = run_worker(job, args.timeout)
            bare.setdefault(name, []).append(r)
            _log(f"  bare {name:36s} {r['seconds']:7.2f} s  cpu {r['cpu_seconds']:7.2f} s")
    job = bench.job("bare", size, store, "bare bf16 autocast", tiles=4, amp="bf16")
    bf16 = run_worker(job, args.timeout)
    probe = run_worker({"mode": "bf16_probe", "label": "bf16 probe", "store": store, "tile": list(args.tile_shape)},
                       args.timeout)

    ref = bench.monai(size, store)
    engine_variants = [("monai-cfg (base)", {}, {}), ("channels_last=True", {"channels_last": True}, {}),
                       ("batch 2", {}, {"batch": 2}), ("batch 8", {}, {"batch": 8}), ("threads=1", {}, {"threads": 1})]
    if args.explore_bf16_engine:
        engine_variants.append(("amp='bf16'", {"amp": "bf16"}, {}))
    eng: dict[str, list] = {}
    for rnd in range(args.explore_rounds):
        for name, cfg, extra in (engine_variants if rnd % 2 == 0 else engine_variants[::-1]):
            if name.startswith("amp") and rnd > 0:
                continue
            pred = Path(store) / "prediction"
            shutil.rmtree(pred, ignore_errors=True)
            job = bench.job("tilewise", size, store, f"tilewise {name}", config={**MONAI_CFG, **cfg})
            job.update(extra)
            r = run_worker(job, args.timeout)
            r["diff"] = bench.compare(str(pred / "probabilities"), ref["out"])
            shutil.rmtree(pred, ignore_errors=True)
            eng.setdefault(name, []).append(r)
            _log(f"  tilewise {name:24s} {r['seconds']:7.2f} s  cpu {r['cpu_seconds']:7.2f} s  "
                 f"max diff {r['diff'].get('max_abs'):.3g}")
    shutil.rmtree(ref["out"], ignore_errors=True)

    print()
    print(f"Explore — {_lscpu()}; torch {bench_torch_version()}; load average at end {load_average()}")
    print(f"Bare model forward, {n_tiles} tiles of {'x'.join(map(str, args.tile_shape))}, fresh process per run, "
          f"{args.explore_rounds} interleaved rounds (min wall, min cpu per tile):")
    for name, rs in bare.items():
        print(f"  {name:38s} {min(r['seconds'] for r in rs) / n_tiles:6.3f} s/tile  cpu "
              f"{min(r['cpu_seconds'] for r in rs) / n_tiles:6.3f} s/tile   runs {[round(r['seconds'], 1) for r in rs]}")
    print(f"  {'bf16 autocast (4 tiles)':38s} {bf16['seconds'] / 4:6.3f} s/tile  cpu {bf16['cpu_seconds'] / 4:6.3f} s/tile")
    print(f"  bf16 autocast vs f32 softmax on 4 real tiles (no blending): max abs {probe['max_abs']:.3g}, "
          f"mean abs {probe['mean_abs']:.3g}")
    print(f"infer_scan at {size}³ (monai placement, f32 out; MONAI reference run {ref['seconds']:.1f} s, "
          f"cpu {ref['cpu_seconds']:.1f} s), min of {args.explore_rounds} interleaved rounds:")
    for name, rs in eng.items():
        print(f"  {name:24s} {min(r['seconds'] for r in rs):8.2f} s  cpu {min(r['cpu_seconds'] for r in rs):7.2f} s  "
              f"working {max(r['working'] for r in rs) / MIB:6.0f} MiB  max|diff| vs MONAI "
              f"{max(r['diff']['max_abs'] for r in rs):.3g}  runs {[round(r['seconds'], 1) for r in rs]}")


def bench_torch_version() -> str:
    try:
        out = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"], check=False,
                             capture_output=True, text=True, timeout=120)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=None, help="comma-separated cube sizes, smallest first (default 256,512; "
                                                   "--quick: 128,192)")
    ap.add_argument("--quick", action="store_true", help="fast check: sizes 128,192, tiles 64³, 1 repeat")
    ap.add_argument("--tile", type=int, default=None, help="tile side (default 96; --quick: 64)")
    ap.add_argument("--batch", type=int, default=4, help="tiles per model call, both sides (default 4)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every worker "
                                                             "(default: torch's own, = cores)")
    ap.add_argument("--repeats", type=int, default=None, help="repeats at the smallest size (default 2; --quick 1)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/tilewise-engine-bench"),
                    help="inputs are cached here (default /tmp/tilewise-engine-bench)")
    ap.add_argument("--explore", action="store_true", help="measure cheap speed-ups instead of the table")
    ap.add_argument("--explore-tiles", type=int, default=16, help="tiles per bare variant in --explore")
    ap.add_argument("--explore-rounds", type=int, default=2, help="interleaved rounds per variant in --explore")
    ap.add_argument("--explore-bf16-engine", action="store_true",
                    help="also run infer_scan with amp='bf16' in --explore (slow without AVX512-BF16/AMX)")
    ap.add_argument("--no-trivial", dest="trivial", action="store_false",
                    help="skip the trivial-model runs (pipeline overhead without the network)")
    ap.add_argument("--no-malloc-probe", dest="malloc_probe", action="store_false",
                    help="skip the diagnostic tilewise run with glibc's mmap-threshold pin toggled (largest size)")
    ap.add_argument("--unpin", action="store_true",
                    help="run every tilewise worker with the engine's glibc mmap-threshold pin disabled "
                         "(what-if; the engine code is not changed)")
    ap.add_argument("--model", choices=("unet", "trivial"), default="unet",
                    help="network of every row: the U-Net, or the trivial cat([x, -x]) model, whose rows then show "
                         "each pipeline's own time and memory (a fast memory check at large sizes)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per worker run")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        job = json.loads(args.worker)
        print(RESULT_MARK + json.dumps(WORKERS[job["mode"]](job)), flush=True)
        return 0

    sizes = [int(s) for s in (args.sizes or ("128,192" if args.quick else "256,512")).split(",") if s.strip()]
    side = args.tile or (64 if args.quick else 96)
    args.tile_shape = (side, side, side)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 2
    t_all = time.perf_counter()
    _log(f"engine benchmark: sizes {sizes}, tile {side}³, batch {args.batch}, workdir {args.workdir}, "
         f"load {load_average()}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    bench = Bench(args, args.workdir)
    try:
        stores = {size: ensure_input(args.workdir, size, args.timeout) for size in sizes}
        if args.explore:
            explore(args, bench, sizes[0], stores[sizes[0]])
        else:
            main_table(args, bench, sizes, stores)
    finally:
        shutil.rmtree(bench.outputs, ignore_errors=True)
        for store in (args.workdir / "inputs").glob("*.zarr"):
            shutil.rmtree(store / "prediction", ignore_errors=True)
    print(f"\nTotal wall time {time.perf_counter() - t_all:.0f} s; load average at end {load_average()}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

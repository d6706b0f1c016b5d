#!/usr/bin/env python
"""Benchmark: a nightly over thousands of tiny scans — what the run costs per scan beyond the compute.

    .venv/bin/python benchmarks/many_scans.py [--sizes 100,1000,5000] [--quick] [--workdir DIR] [--json FILE]

Per size N, a catalog of N tiny EM scans (one 128 x 128 uint8 PNG slice each, with its label slice)
and a tiny registered U-Net (no training) in a home of that size's own. Measured, each in a fresh
process:

* ``reference``: the same N scans through the task functions directly (``ingest_scan`` ->
  ``infer_scan`` -> ``evaluate_scan`` with its pictures -> ``export_scan``), no Prefect, no MLflow,
  in a home of its own: the compute itself. With ``--reference-sample K`` (default 1,000) only the
  first K scans when N is larger, scaled by N / K: the scans are alike, so the compute per scan is
  the same; the table says so (``~``) where it was scaled.
* ``first``:     ``nightly_flow`` over the catalog (embedded Prefect, MLflow on SQLite), every scan new.
* ``unchanged``: ``nightly_flow`` again in the same home, nothing new.

Printed per N: the first run's seconds and its per-scan cost beyond the reference
((first - reference) / N: negative where the flow's batches, run in threads, use both cores
while the reference runs one scan after another), the unchanged run's seconds and per scan, each
run's marginal cost per scan added since the previous N (flat: nothing quadratic), the flow
process's peak RSS (VmHWM) per run against the smallest N's, and the MLflow runs the night left. Targets: unchanged over 1,000 scans <= 60 s; per-scan costs flat
from 100 to 5,000; flow memory flat. ``--quick``: N = 10, 30 (what tests/test_many_scans.py runs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import RESULT_MARK, load_average, proc_status, run_worker  # noqa: E402

NAME = "many"
MODEL = f"{NAME}-unet"
SIDE = 128


# ------------------------------------------------------------------------------------------ set-up

def make_scans(root: Path, n: int) -> Path:
    """N scans ``root/scans/sNNNNN/{image,label}/0.png``: a noisy disk (label: membrane ring)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:SIDE, :SIDE]
    stacks = root / "scans"
    for i in range(n):
        cy, cx, r = rng.integers(40, 88), rng.integers(40, 88), rng.integers(15, 35)
        d = np.hypot(yy - cy, xx - cx)
        ring = np.abs(d - r) < 3
        image = np.clip(rng.normal(160, 20, (SIDE, SIDE)) - 100 * ring, 0, 255).astype("uint8")
        label = np.where(ring, 0, 255).astype("uint8")  # ISBI's convention: membrane 0
        for kind, a in (("image", image), ("label", label)):
            folder = stacks / f"s{i:05d}" / kind
            folder.mkdir(parents=True)
            Image.fromarray(a).save(folder / "0.png")
    return stacks


def write_catalog(root: Path, stacks: Path, extra: str = "") -> Path:
    folder = root / "catalog"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{NAME}.yaml").write_text(textwrap.dedent(f"""
        name: {NAME}
        modality: em
        scans: {{path: "{stacks}/*/image", id: "{{parent}}"}}
        labels: {{path: "{{dir}}/label", mapping: {{255: 0, 0: 1}}, classes: [interior, membrane]}}
        reader: {{spacing: [50, 4, 4], unit: nanometer}}
        chunks: [1, {SIDE}, {SIDE}]
        model: {{architecture: unet}}
        tiling: {{tile: [{SIDE}, {SIDE}], overlap: 0.25, batch: 4}}
        calibration: {{method: none}}
        export: {{format: tiff}}
    """) + extra)
    return folder


def register(name: str = MODEL, seed: int = 0) -> str:
    """A tiny U-Net logged and registered through the registry's own API (no training):
    ``models:/NAME/VERSION``."""
    import mlflow
    import numpy as np
    import torch

    from models import registry
    from models.card import ModelCard, Normalization
    from models.zoo import build

    torch.manual_seed(seed)
    args = {"channels": [4, 8], "num_res_units": 1}
    card = ModelCard(architecture="unet", architecture_args=args, in_channels=1, classes=["interior", "membrane"],
                     label_mapping={255: 0, 0: 1}, spatial_dims=2, tile=[SIDE, SIDE],
                     normalization=Normalization(kind="zscore", mean=[125.0], std=[45.0]), dataset=NAME)
    net = build("unet", 2, 1, 2, **args).eval()
    with mlflow.start_run(experiment_id=registry.experiment_id(name.rsplit("-", 1)[0])) as run:
        info = registry.log_model(net, card, np.zeros((1, 1, SIDE, SIDE), np.float32))
    promotion = registry.register_and_promote(name, info.model_uri, run.info.run_id, "val_dice", 0.5)
    return f"models:/{name}/{promotion.version}"


def _quiet_mlflow() -> None:
    import mlflow.models

    mlflow.models.infer_pip_requirements = lambda model_uri, flavor, fallback=None, **kw: list(fallback or [])


# ------------------------------------------------------------------------------------------ workers

def worker_setup(job: dict) -> dict:
    root = Path(job["root"])
    stacks = make_scans(root, job["n"])
    write_catalog(root, stacks, job.get("extra", ""))
    _quiet_mlflow()
    version = register()
    return {"version": version}


def worker_reference(job: dict) -> dict:
    """The scans through the task functions: ingest, infer, evaluate (+ pictures), export."""
    import torch

    from data_catalog import find_entry
    from flows.infer import engine_config
    from tasks.engine.infer import infer_scan
    from tasks.export import ExportOptions, export_scan
    from tasks.ingest import discover_scans, ingest_scan
    from tasks.metrics.evaluate import evaluate_scan
    from tasks.reports.overlay import evaluation_images
    from tasks.settings import scan_store, tilewise_home

    torch.set_num_threads(1)
    loaded = find_entry(NAME, Path(job["catalog"]))
    from tasks.engine.model_io import load_model

    os.environ["MLFLOW_TRACKING_URI"] = job["tracking"]  # the flow home's registry, read once
    model = load_model(job["version"])
    config = engine_config(loaded.entry)
    t0 = time.perf_counter()
    specs = discover_scans(loaded)[: job.get("sample") or None]
    out = tilewise_home() / "exports" / NAME
    out.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        store = scan_store(NAME, spec.scan_id)
        ingest_scan(spec, store)
        infer_scan(store, model, config)
        report = evaluate_scan(store, entry=loaded.entry)
        evaluation_images(report, tilewise_home() / "reports" / NAME / spec.scan_id)
        export_scan(store, ExportOptions("tiff", str(out / f"{spec.scan_id}.ome.tif")))
    return {"seconds": time.perf_counter() - t0, "scans": len(specs), "peak_rss": proc_status("VmHWM")}


def worker_flow(job: dict) -> dict:
    import logging

    import torch

    _quiet_mlflow()
    torch.set_num_threads(1)
    for name in ("prefect", "flows", "tasks", "mlflow"):  # a line per task run would time the terminal
        logging.getLogger(name).setLevel(logging.WARNING)
    import flows  # noqa: F401  (embedded defaults)
    from flows.nightly import nightly_flow
    from mlflow import MlflowClient

    from models import registry

    t0 = time.perf_counter()
    state = nightly_flow(catalog=job["catalog"], return_state=True)
    seconds = time.perf_counter() - t0
    outcomes = state.result(raise_on_failure=False)
    if isinstance(outcomes, BaseException):
        raise outcomes
    compute = sum(o.seconds for o in outcomes if o.step in ("ingest", "infer", "export"))
    c = MlflowClient(tracking_uri=registry.tracking_uri())
    runs = c.search_runs([registry.experiment_id(NAME)], max_results=50000)
    scans = {o.scan_id for o in outcomes if o.scan_id != "*"}
    worked = sum(1 for o in outcomes if o.did_work)
    failed = sorted({f"{o.scan_id} {o.step}: {o.message}" for o in outcomes if o.failed})[:5]
    return {"seconds": seconds, "scans": len(scans), "steps_did_work": worked, "failed": failed,
            "completed": state.is_completed(), "step_seconds": compute, "peak_rss": proc_status("VmHWM"),
            "mlflow_runs": len(runs) - 1}  # less the model's registration run


def worker(job: dict) -> None:
    os.environ["TILEWISE_HOME"] = job["home"]
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("PREFECT_HOME", None)
    os.environ.pop("TILEWISE_STORE_ROOT", None)
    os.chdir(job["home"])
    result = {"setup": worker_setup, "reference": worker_reference, "flow": worker_flow}[job["mode"]](job)
    print(RESULT_MARK + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------ driver

def measure(n: int, workdir: Path, timeout: float, sample: int = 1000) -> dict:
    root = workdir / f"n{n}"
    shutil.rmtree(root, ignore_errors=True)
    home, ref_home = root / "home", root / "reference-home"
    home.mkdir(parents=True)
    ref_home.mkdir()
    script = str(Path(__file__).resolve())
    t0 = time.perf_counter()
    setup = run_worker(script, {"mode": "setup", "root": str(root), "n": n, "home": str(home)}, timeout)
    print(f"  N={n}: {n} scans and a model in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    catalog = str(root / "catalog")
    ref = run_worker(script, {"mode": "reference", "home": str(ref_home), "catalog": catalog,
                              "version": setup["version"], "sample": sample if n > sample else None,
                              "tracking": f"sqlite:///{home / 'mlflow.db'}"}, timeout)
    if ref["scans"] < n:  # measured on the first scans, alike the others: scaled
        ref = {**ref, "measured_seconds": ref["seconds"], "measured_scans": ref["scans"],
               "seconds": ref["seconds"] * n / ref["scans"], "scans": n}
    print(f"  N={n}: reference {ref['seconds']:.1f} s"
          + (f" (~: {ref['measured_scans']} scans measured, scaled)" if "measured_scans" in ref else ""),
          file=sys.stderr, flush=True)
    first = run_worker(script, {"mode": "flow", "home": str(home), "catalog": catalog}, timeout)
    print(f"  N={n}: first nightly {first['seconds']:.1f} s", file=sys.stderr, flush=True)
    again = run_worker(script, {"mode": "flow", "home": str(home), "catalog": catalog}, timeout)
    print(f"  N={n}: unchanged nightly {again['seconds']:.1f} s", file=sys.stderr, flush=True)
    return {"n": n, "reference": ref, "first": first, "unchanged": again,
            "first_overhead_per_scan": (first["seconds"] - ref["seconds"]) / n,
            "unchanged_per_scan": again["seconds"] / n}


def table(results: list[dict]) -> str:
    """The figures per N. ``marginal``: what each scan added since the previous N costs, seconds of
    the run per added scan: flat with N when nothing is quadratic (the fixed start-up cost, about
    10 s here, drops out of it)."""
    base = results[0]
    lines = ["| N | reference s | first nightly s | first − reference, per scan | first, marginal per scan | "
             "unchanged s | unchanged per scan | unchanged, marginal per scan | "
             "peak RSS first / unchanged MB (× smallest N) | MLflow runs | unchanged promise |", "|" + "---|" * 11]
    previous = None
    for r in results:
        f, u = r["first"], r["unchanged"]
        ok = u["steps_did_work"] == 0 and not u["failed"] and f["completed"] and u["completed"]
        if previous is None:
            marginal_first = marginal_unchanged = "–"
        else:
            added = r["n"] - previous["n"]
            marginal_first = f"{(f['seconds'] - previous['first']['seconds']) / added * 1000:.0f} ms"
            marginal_unchanged = f"{(u['seconds'] - previous['unchanged']['seconds']) / added * 1000:.1f} ms"
        lines.append(
            f"| {r['n']:,} | {'~' if 'measured_scans' in r['reference'] else ''}{r['reference']['seconds']:.1f} | "
            f"{f['seconds']:.1f} | {r['first_overhead_per_scan'] * 1000:.0f} ms | {marginal_first} | "
            f"{u['seconds']:.1f} | {r['unchanged_per_scan'] * 1000:.1f} ms | {marginal_unchanged} | "
            f"{f['peak_rss'] / 1e6:.0f} / {u['peak_rss'] / 1e6:.0f} "
            f"({f['peak_rss'] / base['first']['peak_rss']:.2f}× / {u['peak_rss'] / base['unchanged']['peak_rss']:.2f}×) | "
            f"{f['mlflow_runs']} | {'kept' if ok else 'BROKEN: ' + '; '.join(u['failed'] or [str(u['steps_did_work'])])} |")
        previous = r
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--sizes", default="100,1000,5000")
    p.add_argument("--quick", action="store_true", help="N = 10, 30")
    p.add_argument("--workdir", help="where scans and homes go (default: a temporary folder, removed after)")
    p.add_argument("--json", help="write the figures there too")
    p.add_argument("--timeout", type=float, default=4 * 3600)
    p.add_argument("--reference-sample", type=int, default=1000,
                   help="the reference runs the first K scans when N is larger, scaled by N / K")
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return []
    sizes = [10, 30] if args.quick else [int(s) for s in args.sizes.split(",")]
    keep = args.workdir is not None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tilewise-many-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"many scans: N = {', '.join(map(str, sizes))}; load average {load_average()}", file=sys.stderr)
    try:
        results = [measure(n, workdir, args.timeout, args.reference_sample) for n in sizes]
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(table(results))
    print(f"load average after: {load_average()}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()

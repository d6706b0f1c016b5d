"""Instance quality on data the model never saw (issue 9's benchmark).

Not a test: a report. SpaceNet 1 Rio building chips from ../shared/data (satellite/
spacenet1_rio_buildings, 9 chips 50-58): a model is trained on chips 50-55 by the same code as
``tilewise train`` (benchmarks/train.py's throw-away catalog, MLflow and registry under a temporary
TILEWISE_HOME) within ``--minutes`` of wall-clock on ``--threads`` CPU threads, then run over the
held-out chips 56 and 57 and chip 58 (100 % nodata, the empty edge case):

- ``maskrcnn``: ``tilewise infer`` in instance mode (Mask R-CNN over 256² tiles, overlap 0.5,
  merged across tiles; tasks/instances/detect.py);
- ``deeplab``: the semantic engine, then connected components of the building class
  (``tilewise instances``, min size 16 px; tasks/instances/from_semantic.py).

Scores (tasks/metrics/instance_eval.py) against reference instances = connected components of the
reference building masks (min size 16 px): COCO AP / AP50 / AP75, F1 at IoU 0.5, PQ, per chip, and
F1 pooled over the held-out chips. Touching buildings are one reference instance (the masks carry no
instance ids). With ``--threads 1`` two cases can run side by side on a 2-core machine, each with
``--minutes`` CPU-minutes.

    python benchmarks/instances.py [--minutes 20] [--threads 1] [--only maskrcnn,deeplab] [--shared DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.train import ingest_datasets, link_all, prepare  # noqa: E402  (after the path)


def run_case(arch: str, shared: Path, minutes: float, epochs: int) -> dict:
    from data_catalog import find_entry
    from tasks import storage
    from tasks.engine.infer import EngineConfig, infer_scan
    from tasks.engine.model_io import load_model
    from tasks.instances.detect import infer_instances
    from tasks.instances.from_semantic import instances_from_prediction
    from tasks.metrics.instance_eval import evaluate_instances
    from tasks.training.train import train_dataset

    work = Path(tempfile.mkdtemp(prefix=f"tilewise-bench-instances-{arch}-"))
    os.environ["TILEWISE_HOME"] = str(work / "home")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    catalog, train_name, test_name, _ = prepare(arch, shared, work)
    empty = "3band_013022223130_Public_img58.tif"  # all nodata: the empty edge case
    src = shared / "satellite/spacenet1_rio_buildings"
    link_all([src / "images" / empty], work / "sat_test/images")
    link_all([src / "masks" / empty], work / "sat_test/masks")
    stores = ingest_datasets(catalog, [train_name, test_name])
    t0 = time.perf_counter()
    report = train_dataset(find_entry(train_name, catalog), architecture=arch, epochs=epochs, max_minutes=minutes)
    train_minutes = (time.perf_counter() - t0) / 60
    model = load_model(f"models:/{report.registered.split('/')[0]}@champion")
    config = EngineConfig(tile=tuple(model.card.tile), overlap=0.5)
    per_chip, tp, n_ref, n_pred = {}, 0, 0, 0
    for store in stores[test_name]:
        t1 = time.perf_counter()
        if arch == "maskrcnn":
            r = infer_instances(store, model, config)
            extra = {"tiles": r.tiles, "nodata_tiles_skipped": r.skipped_nodata}
        else:
            infer_scan(store, model, config)
            r = instances_from_prediction(store, method="components", classes=["building"], min_size=16)
            extra = {}
        group = storage.open_group(store, mode="r")
        scores = evaluate_instances(store, storage.reference(group), things=[1], names=["background", "building"],
                                    min_size=16)
        tp, n_ref, n_pred = tp + scores["tp"], n_ref + scores["reference_instances"], n_pred + scores["predicted_instances"]
        per_chip[Path(store).name.removesuffix(".zarr")] = {
            **{k: (round(scores[k], 4) if isinstance(scores[k], float) else scores[k])
               for k in ("ap", "ap50", "ap75", "f1", "precision", "recall", "pq", "reference_instances",
                         "predicted_instances")}, **extra, "seconds": round(time.perf_counter() - t1, 1)}
    return {"architecture": arch, "minutes_budget": minutes, "train_minutes": round(train_minutes, 1),
            "threads": int(os.environ.get("TILEWISE_BENCH_THREADS", "0")) or None, "epochs": report.epochs,
            "stopped": report.stopped, report.metric_name: round(report.metric, 4),
            "train_chips": "50-55", "held_out_chips": "56-58 (58: all nodata)",
            "pooled_f1_iou50": round(2 * tp / (n_ref + n_pred), 4) if n_ref + n_pred else None,
            "reference_instances": n_ref, "predicted_instances": n_pred, "per_chip": per_chip}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--epochs", type=int, default=500, help="epoch cap (the budget usually ends first)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--only", default="maskrcnn,deeplab")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    os.environ["TILEWISE_BENCH_THREADS"] = str(args.threads)
    for arch in args.only.split(","):
        print(f"--- {arch}: training for up to {args.minutes:g} min on {args.threads} thread(s) ...", file=sys.stderr,
              flush=True)
        print(json.dumps(run_case(arch, args.shared, args.minutes, args.epochs)), flush=True)


if __name__ == "__main__":
    main()

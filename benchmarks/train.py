"""Train each architecture on real data within a budget and score it on data it never saw.

Not a test: a report. Reads the full datasets from ../shared/data (the repository ships only a
sample). For each case a throw-away catalog points a training dataset and a held-out dataset at
disjoint scans; training runs through the same code as ``tilewise train`` (MLflow, registry,
champion rule) under a temporary TILEWISE_HOME, the champion is run over the held-out scans by
the engine, and the metric is computed against their labels:

- EM U-Net (2D): adapted Rand error (skimage) of cell segmentations (connected components of the
  predicted vs true interior) on ISBI 2012 slices 24-29, trained on slices 0-23.
- MRI U-Net (3D): whole-tumour Dice (label > 0) on one BraTS subject, trained on the other three.
- Satellite DeepLab v3+: building IoU on SpaceNet Rio chips 56-57, trained on chips 50-55.
- Satellite Mask R-CNN: COCO mask AP50 of building instances on chips 56-57.

    python benchmarks/train.py [--minutes 20] [--only em,mri,deeplab,maskrcnn] [--shared ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def link_all(files: list[Path], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        (folder / f.name).symlink_to(f)
    return folder


def write_catalog(folder: Path, entries: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in entries.items():
        (folder / f"{name}.yaml").write_text(text)
    return folder


def prepare(case: str, shared: Path, work: Path) -> tuple[Path, str, str, str]:
    """(catalog folder, train dataset, test dataset, architecture)"""
    if case == "em":
        src = shared / "em/isbi2012_train"
        for part, idx in (("train", range(0, 24)), ("test", range(24, 30))):
            link_all([src / "image" / f"{i}.png" for i in idx], work / f"em_{part}/stack/image")
            link_all([src / "label" / f"{i}.png" for i in idx], work / f"em_{part}/stack/label")
        body = """modality: em
scans: {{path: "{root}/stack/image", id: "{{parent}}"}}
labels: {{path: "{{dir}}/label", mapping: {{255: 0, 0: 1}}, classes: [interior, membrane]}}
reader: {{spacing: [50, 4, 4], unit: nanometer}}
chunks: [8, 512, 512]
model: {{name: {name}-unet, architecture: unet}}
tiling: {{tile: [256, 256], overlap: 0.5}}
"""
        cat = write_catalog(work / "catalog", {
            f"em_{p}": f"name: em_{p}\n" + body.format(root=work / f"em_{p}", name=f"em_{p}") for p in ("train", "test")})
        return cat, "em_train", "em_test", "unet"
    if case == "mri":
        src = shared / "mri/brats2015_deepmedic"
        subjects = sorted(p for p in src.iterdir() if p.is_dir())
        for part, group in (("train", subjects[:3]), ("test", subjects[3:])):
            (work / f"mri_{part}").mkdir(parents=True, exist_ok=True)
            for s in group:
                (work / f"mri_{part}" / s.name).symlink_to(s)
        body = """modality: mri
scans: {{path: "{root}/brats_*", channels: [Flair_subtrMeanDivStd.nii.gz, T1c_subtrMeanDivStd.nii.gz], id: "{{name}}"}}
labels: {{path: "{{scan}}/OTMultiClass.nii.gz", mapping: {{0: 0, 1: 1, 2: 2, 3: 3, 4: 4}},
          classes: [background, necrosis, edema, non_enhancing, enhancing]}}
reader: {{unit: millimeter}}
chunks: [64, 64, 64]
model: {{name: {name}-unet, architecture: unet}}
tiling: {{tile: [64, 64, 64], overlap: 0.5}}
"""
        cat = write_catalog(work / "catalog", {
            f"mri_{p}": f"name: mri_{p}\n" + body.format(root=work / f"mri_{p}", name=f"mri_{p}") for p in ("train", "test")})
        return cat, "mri_train", "mri_test", "unet"
    src = shared / "satellite/spacenet1_rio_buildings"
    for part, idx in (("train", range(50, 56)), ("test", range(56, 58))):
        names = [f"3band_013022223130_Public_img{i}.tif" for i in idx]
        link_all([src / "images" / n for n in names], work / f"sat_{part}/images")
        link_all([src / "masks" / n for n in names], work / f"sat_{part}/masks")
    arch = "deeplab" if case == "deeplab" else "maskrcnn"
    body = """modality: satellite
scans: {{path: "{root}/images/*.tif"}}
labels: {{path: "{{dir}}/../masks/{{name}}", mapping: {{0: 0, 255: 1}}, classes: [background, building]}}
chunks: [512, 512]
model: {{name: {name}-{arch}, architecture: {arch}}}
tiling: {{tile: [256, 256], overlap: 0.5}}
"""
    cat = write_catalog(work / "catalog", {
        f"sat_{p}": f"name: sat_{p}\n" + body.format(root=work / f"sat_{p}", name=f"sat_{p}", arch=arch)
        for p in ("train", "test")})
    return cat, "sat_train", "sat_test", arch


def held_out(case: str, stores: list[str], model_uri: str) -> dict:
    import zarr
    from skimage.measure import label as components
    from skimage.metrics import adapted_rand_error

    from tasks.engine.infer import EngineConfig, infer_scan
    from tasks.engine.model_io import load_model
    from tasks.training.instances import instances_from_labels, mask_ap50

    model = load_model(model_uri)
    tile = tuple(model.card.tile)
    scores: dict[str, list] = {}
    predictions, truths = [], []
    for store in stores:
        infer_scan(store, model, EngineConfig(tile=tile, overlap=0.5, output_dtype="float32"))
        pred = zarr.open_array(f"{store}/prediction/labels")[:]
        truth = zarr.open_array(f"{store}/labels/reference")[:]
        if case == "em":  # cells = connected components of the interior class (0), per section
            for z in range(pred.shape[0]):
                are, _, _ = adapted_rand_error(components(truth[z] == 0, connectivity=1),
                                               components(pred[z] == 0, connectivity=1))
                scores.setdefault("adapted_rand_error", []).append(are)
            scores.setdefault("pixel_error", []).append(float((pred != truth).mean()))
        elif case == "mri":
            p, t = pred > 0, truth > 0
            scores.setdefault("whole_tumour_dice", []).append(float(2 * (p & t).sum() / (p.sum() + t.sum())))
        elif case == "deeplab":
            p, t = pred == 1, truth == 1
            scores.setdefault("inter", []).append(int((p & t).sum()))
            scores.setdefault("union", []).append(int((p | t).sum()))
        else:  # Mask R-CNN: detections on the whole chip
            import torch

            image = np.asarray(zarr.open_array(f"{store}/image/0")[:], np.float32)
            x = model.card.normalization.apply(image[None])[0]
            detector = model.module.detector
            with torch.inference_mode():
                det = detector([torch.from_numpy(x)])[0]
            predictions.append({"masks": (det["masks"][:, 0] >= 0.5).numpy(), "scores": det["scores"].numpy(),
                                "labels": det["labels"].numpy()})
            truths.append(instances_from_labels(truth, {1: 1}))
    if case == "em":
        return {"adapted_rand_error": float(np.mean(scores["adapted_rand_error"])),
                "pixel_error": float(np.mean(scores["pixel_error"]))}
    if case == "mri":
        return {"whole_tumour_dice": float(np.mean(scores["whole_tumour_dice"]))}
    if case == "deeplab":
        return {"building_iou": sum(scores["inter"]) / max(sum(scores["union"]), 1)}
    return {"building_ap50": mask_ap50(predictions, truths)}


TARGETS = {"em": ("adapted_rand_error", "<=", 0.15), "mri": ("whole_tumour_dice", ">=", 0.75),
           "deeplab": ("building_iou", ">=", 0.65), "maskrcnn": ("building_ap50", ">=", None)}


def ingest_datasets(catalog: Path, names: list[str]) -> dict[str, list[str]]:
    """Every scan of the named catalog datasets ingested into the current home; their stores."""
    from data_catalog import find_entry
    from tasks.ingest import discover_scans, ingest_scan
    from tasks.settings import scan_store

    stores: dict[str, list[str]] = {}
    for name in names:
        stores[name] = []
        for spec in discover_scans(find_entry(name, catalog)):
            store = scan_store(name, spec.scan_id)
            ingest_scan(spec, store)
            stores[name].append(store)
    return stores


def run_case(case: str, shared: Path, minutes: float, epochs: int) -> dict:
    from data_catalog import find_entry
    from tasks.training.train import train_dataset

    work = Path(tempfile.mkdtemp(prefix=f"tilewise-bench-{case}-"))
    os.environ["TILEWISE_HOME"] = str(work / "home")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    catalog, train_name, test_name, arch = prepare(case, shared, work)
    stores = ingest_datasets(catalog, [train_name, test_name])
    t0 = time.perf_counter()
    report = train_dataset(find_entry(train_name, catalog), architecture=arch, epochs=epochs, max_minutes=minutes)
    train_minutes = (time.perf_counter() - t0) / 60
    metrics = held_out(case, stores[test_name], f"models:/{report.registered.split('/')[0]}@champion")
    return {"case": case, "architecture": arch, "train_minutes": round(train_minutes, 1), "epochs": report.epochs,
            "stopped": report.stopped, report.metric_name: round(report.metric, 4),
            **{k: round(v, 4) for k, v in metrics.items()},
            "train_scans": len(stores[train_name]), "test_scans": len(stores[test_name])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget per case")
    parser.add_argument("--epochs", type=int, default=200, help="epoch cap (the budget usually ends first)")
    parser.add_argument("--only", default="em,mri,deeplab,maskrcnn")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    args = parser.parse_args()
    rows = []
    for case in args.only.split(","):
        print(f"--- {case}: training for up to {args.minutes:g} min ...", file=sys.stderr, flush=True)
        row = run_case(case, args.shared, args.minutes, args.epochs)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\ncase      metric                 value   target  met   train min  epochs  stopped")
    for row in rows:
        name, op, target = TARGETS[row["case"]]
        value = row[name]
        met = "-" if target is None else ("yes" if (value <= target if op == "<=" else value >= target) else "no")
        print(f"{row['case']:<9} {name:<22} {value:<7.4f} {op if target else ''}{target or '':<6} {met:<5} "
              f"{row['train_minutes']:<10} {row['epochs']:<7} {row['stopped']}")


if __name__ == "__main__":
    main()

"""Calibrate a registered model version on its own validation split and store the calibrator with it.

The split is the one recorded at training time (``tilewise/validation.json`` in the version's run);
for versions trained before that was recorded, ``tasks.training.data.split_regions`` recomputed
with the run's recorded seed (the same deterministic split training used).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tasks.calibration.calibrator import Calibrator, fit_calibrator
from tasks.calibration.scores import CalibrationError
from tasks.training.data import Region

log = logging.getLogger(__name__)


@dataclass
class CalibrationOutcome:
    model: str  # models:/NAME/VERSION
    calibrator: Calibrator
    regions_from: str  # "recorded" | "recomputed (seed N)"
    diagram: str | None = None


def validation_regions(uri: str, loaded, store_root: str | None = None) -> tuple[list[Region], str]:
    """The version's validation regions as boxes of this installation's scan groups."""
    from models import calibrator_store
    from tasks.settings import scan_store

    entry = loaded.entry
    record = calibrator_store.load_validation(uri)
    if record is not None:
        regions = [Region(scan_store(entry.name, r["scan_id"], store_root),
                          tuple(slice(int(a), int(b)) for a, b in r["box"])) for r in record["regions"]]
        return regions, "recorded at training"
    from tasks.ingest import discover_scans
    from tasks.training.data import open_training_scan, split_regions

    seed = int(float(calibrator_store.run_params(uri).get("seed", 0)))
    classes = len(entry.labels.classes)
    scans = [open_training_scan(scan_store(entry.name, s.scan_id, store_root), classes)
             for s in discover_scans(loaded)]
    return split_regions(scans, seed=seed, by="scan")[1], f"recomputed with the run's seed {seed}"


def validation_record(regions: list[Region], dataset: str, seed: int) -> dict:
    """What training records (store-relative: scan ids, not paths)."""
    return {"dataset": dataset, "seed": seed,
            "regions": [{"scan_id": Path(r.store.rstrip("/")).name.removesuffix(".zarr"),
                         "box": [[s.start, s.stop] for s in r.box]} for r in regions]}


def calibrate_model(loaded, uri: str, method: str = "auto", store_root: str | None = None, *,
                    tiles: int = 24, per_class: int = 20000, seed: int = 0, device: str | None = None
                    ) -> CalibrationOutcome:
    """Sample the validation split of ``uri``'s version (catalog entry ``loaded``), fit the calibrator
    (``method``: auto | cubic | isotonic | temperature | ovr-cubic) and store it in MLflow."""
    from models import calibrator_store
    from models.registry import RegistryError, load_registered
    from tasks.calibration.diagram import reliability_diagram
    from tasks.calibration.sample import sample_validation

    entry = loaded.entry
    try:
        model = load_registered(uri)
    except RegistryError as exc:
        raise CalibrationError(str(exc), uri) from None
    if entry.labels is None:
        raise CalibrationError(f"dataset '{entry.name}' has no labels to calibrate against", loaded.file)
    classes = list(entry.labels.classes)
    if model.card.classes is not None and list(model.card.classes) != classes:
        raise CalibrationError(f"the model's classes {model.card.classes} are not the labels' classes {classes} "
                               "(instance models are not calibrated)", model.identity)
    if method == "cubic" and len(classes) > 2:  # the cubic of each class against the rest, renormalised
        method = "ovr-cubic"
    regions, regions_from = validation_regions(uri, loaded, store_root)
    sample = sample_validation(model, regions, classes, tiles=tiles, per_class=per_class, seed=seed,
                               pad=entry.tiling.pad, device=device)
    sample.fitted_on["regions"] = validation_record(regions, entry.name, seed)["regions"]
    sample.fitted_on["model"] = model.identity
    sample.fitted_on["regions_from"] = regions_from
    calibrator = fit_calibrator(sample, method=method, seed=seed)
    where = ", ".join(f"{r['scan_id']}[{' '.join(f'{a}:{b}' for a, b in r['box'])}]"
                      for r in sample.fitted_on["regions"])
    tags = {"method": calibrator.method, "sha256": calibrator.sha256,
            "fitted_on": f"validation split ({regions_from}): {where}; {sample.fitted_on['tiles']} tiles, "
                         f"{sample.labels.size} pixels"}
    summary = calibrator.summary()
    tags.update({k: f"{v:.6g}" for k, v in summary.items() if v is not None})
    with tempfile.TemporaryDirectory() as tmp:
        before, after = calibrator.held_out
        png = reliability_diagram(before, after, Path(tmp) / "reliability.png",
                                  f"{model.identity}: {calibrator.method} (held-out validation pixels)")
        stored = calibrator_store.store_calibrator(model.identity, calibrator.to_json(), tags, summary, png)
    log.info("%s: calibrator %s stored (%s)", stored, calibrator.method, calibrator.chosen_because)
    return CalibrationOutcome(stored, calibrator, regions_from, f"{stored} run artifact calibration/reliability.png")


def load_calibrator(model_identity: str) -> Calibrator | None:
    """The calibrator stored with ``models:/NAME/VERSION`` (or ``@ALIAS``), None if it has none."""
    from models import calibrator_store
    from models.registry import RegistryError

    try:
        data = calibrator_store.load_calibrator_dict(model_identity)
    except RegistryError as exc:
        raise CalibrationError(str(exc), model_identity) from None
    return None if data is None else Calibrator(**{k: v for k, v in data.items() if k != "held_out"})

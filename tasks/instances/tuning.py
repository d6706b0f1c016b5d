"""The EM watershed's settings, tuned on a model version's own validation sections.

The seeded watershed (tasks/instances/watershed.py) turns a membrane probability into cells; how
many seeds it finds depends on the seed threshold (interior probability needed for a seed) and on
smoothing the map first (a median filter, as the ISBI 2012 winner did). The right values depend on
the model: a sharper or softer membrane map moves them. So after training, each version's settings
are chosen on the sections it was validated on (never trained on, never scored on later): the
adapted Rand error (scikit-image, the ISBI 2012 / SNEMI measure) of full segmentations -- cells
grown over the membrane pixels, as the challenge scores them -- against the reference cells
(connected components of the reference's interior), for every pair of a seed-threshold grid and
median sizes; the pair with the lowest mean error wins (ties: the first in grid order).

The result is stored with the version (``tilewise/watershed.json`` in its run, tags
``watershed.*``); the instances step uses it when the catalog leaves ``instances.seed_threshold``
or ``instances.median`` unset (tasks/identity.py: the values enter the instances' digest).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

SEED_THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5)
MEDIANS = (0, 3, 5)
DEFAULT = {"seed_threshold": 0.3, "median": 0}  # what the catalog's watershed uses without tuning
FILE = "watershed.json"


@dataclass
class WatershedTuning:
    seed_threshold: float
    median: int
    adapted_rand_error: float  # mean over the validation sections, at the chosen settings
    default_error: float  # the same, at DEFAULT
    sections: int
    grid: list[dict] = field(default_factory=list)  # every pair tried with its mean error

    def record(self) -> dict:
        return asdict(self)


def full_segmentation(membrane: np.ndarray, seed_threshold: float, median: int, min_size: int) -> np.ndarray:
    """The pipeline's cells of one (Y, X) section, grown over the membrane so every pixel has one."""
    from scipy import ndimage
    from skimage.segmentation import watershed

    from tasks.instances.watershed import cells_in_section

    cells = cells_in_section(membrane, seed_threshold=seed_threshold, min_size=min_size, median=median)
    smooth = ndimage.median_filter(np.asarray(membrane, np.float32), size=median) if median > 1 else membrane
    return watershed(smooth, cells) if cells.any() else cells


def reference_cells(interior: np.ndarray) -> np.ndarray:
    """Cells of a reference section: the 4-connected components of its interior pixels."""
    from skimage.measure import label

    return label(interior, connectivity=1)


def tune_watershed(membranes: list[np.ndarray], interiors: list[np.ndarray], min_size: int = 16,
                   seed_thresholds=SEED_THRESHOLDS, medians=MEDIANS) -> WatershedTuning:
    """The (seed threshold, median) with the lowest mean adapted Rand error over the sections.
    ``membranes``: (Y, X) membrane probabilities; ``interiors``: (Y, X) bool reference interiors."""
    from skimage.metrics import adapted_rand_error

    if not membranes or len(membranes) != len(interiors):
        raise ValueError("tuning needs one reference section per membrane section, and at least one")
    truths = [reference_cells(i) for i in interiors]

    def error(threshold: float, median: int) -> float:
        return float(np.mean([adapted_rand_error(t, full_segmentation(m, threshold, median, min_size))[0]
                              for m, t in zip(membranes, truths)]))

    grid = [{"seed_threshold": t, "median": m, "adapted_rand_error": error(t, m)}
            for m in medians for t in seed_thresholds]
    best = min(grid, key=lambda g: g["adapted_rand_error"])
    default = next((g["adapted_rand_error"] for g in grid if g["seed_threshold"] == DEFAULT["seed_threshold"]
                    and g["median"] == DEFAULT["median"]), None)
    if default is None:
        default = error(DEFAULT["seed_threshold"], DEFAULT["median"])
    return WatershedTuning(best["seed_threshold"], best["median"], best["adapted_rand_error"], default,
                           len(membranes), grid)


def validation_sections(model, regions, membrane_class: int, interior_class: int, pad: str = "reflect"
                        ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The calibrated membrane probability and the reference interior of every section of
    ``regions`` (boxes of scan groups, (Z, Y, X) or (Y, X)), predicted by ``model`` (a LoadedModel,
    with its calibrator) by MONAI's Gaussian sliding window over each region (a 2D model section by
    section), as the engine blends its tiles."""
    import torch
    from monai.inferers import sliding_window_inference

    from tasks import storage
    from tasks.calibration.calibrator import Calibrator

    card = model.card
    calibrator = None
    if model.calibrator is not None:
        calibrator = model.calibrator if isinstance(model.calibrator, Calibrator) else Calibrator(**{
            k: v for k, v in model.calibrator.items() if k != "held_out"})
    membranes, interiors = [], []
    for region in regions:
        group = storage.open_group(region.store, mode="r")
        image = np.asarray(group["image/0"][(slice(None),) + tuple(region.box)], np.float32)
        labels = np.asarray(storage.reference(group)[tuple(region.box)])
        if labels.ndim == 2:
            image, labels = image[:, None], labels[None]
        stacks = [(image[:, z], labels[z]) for z in range(labels.shape[0])] if card.spatial_dims == 2 \
            else [(image, labels)]
        for x, truth in stacks:
            tile = list(card.tile or x.shape[1:])
            batch = torch.from_numpy(card.normalization.apply(x[None].copy()))
            with torch.no_grad():
                logits = sliding_window_inference(batch, tile, 4, model.module, overlap=0.5, mode="gaussian",
                                                  padding_mode="reflect" if pad == "reflect" else "constant")
            probs = torch.softmax(logits, 1)[0].numpy()
            if calibrator is not None:
                probs = calibrator.apply(probs)
            sections = [(probs[membrane_class], truth)] if truth.ndim == 2 else \
                [(probs[membrane_class][z], truth[z]) for z in range(truth.shape[0])]
            for membrane, t in sections:
                membranes.append(membrane)
                interiors.append(t == interior_class)
    return membranes, interiors


def tune_model(loaded, uri: str, store_root: str | None = None, min_size: int | None = None) -> WatershedTuning:
    """Tune the watershed of version ``uri`` of dataset ``loaded`` on its validation split and store
    the result with the version (module docstring)."""
    from models import calibrator_store
    from models.registry import load_registered
    from tasks.calibration.model_version import validation_regions

    entry = loaded.entry
    classes = list(entry.labels.classes)
    inst = entry.instances
    membrane = (inst.membrane_class if inst and inst.membrane_class else None) or entry.labels.boundary_class
    if membrane not in classes:
        raise ValueError(f"dataset '{entry.name}': the watershed needs a membrane class among {classes}")
    interior = next(i for i, c in enumerate(classes) if c != membrane)
    model = load_registered(uri)
    regions, _ = validation_regions(uri, loaded, store_root)
    membranes, interiors = validation_sections(model, regions, classes.index(membrane), interior, entry.tiling.pad)
    tuning = tune_watershed(membranes, interiors, min_size=min_size or (inst.min_size if inst else 16))
    calibrator_store.store_tuning(uri, FILE, tuning.record(),
                                  {"seed_threshold": tuning.seed_threshold, "median": tuning.median,
                                   "adapted_rand_error": f"{tuning.adapted_rand_error:.4f}",
                                   "default_error": f"{tuning.default_error:.4f}", "sections": tuning.sections})
    return tuning


def tuned_settings(uri: str) -> dict | None:
    """{"seed_threshold", "median"} stored with ``models:/NAME/VERSION``, or None when it has none."""
    from models import calibrator_store

    record = calibrator_store.load_tuning(uri, FILE)
    return None if record is None else {"seed_threshold": float(record["seed_threshold"]),
                                        "median": int(record["median"])}


def watershed_values(seed_threshold: float | None, median: int | None, model: str) -> tuple[float, int]:
    """(seed threshold, median) of a watershed: the catalog's where it sets them, else the values
    tuned for the prediction's model version (``models:/NAME/VERSION``), else :data:`DEFAULT`."""
    tuned = _tuned(model) if (seed_threshold is None or median is None) else None
    tuned = tuned or DEFAULT
    return (float(seed_threshold if seed_threshold is not None else tuned["seed_threshold"]),
            int(median if median is not None else tuned["median"]))


_TUNED: dict[str, dict] = {}


def _tuned(model: str) -> dict | None:
    """A version's tuned watershed, read once per process once it exists (a version's tuning never
    changes; a version not tuned yet -- training tunes it right after registering it -- is asked again)."""
    if not model.startswith("models:/"):
        return None  # a TorchScript file: no registry entry
    if model not in _TUNED:
        found = tuned_settings(model)
        if found is None:
            return None
        _TUNED[model] = found
    return _TUNED[model]

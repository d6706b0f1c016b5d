"""Whole-region validation with the engine's pieces, so the metric that picks the champion is the
metric a user sees after ``infer``.

Every validation region (whole scans, or the slice range at the end of a single scan; never
sampled for training, see :func:`tasks.training.data.split_regions`) is predicted as ``infer``
predicts a scan: the engine's tile plan, mirrored padding, Gaussian blending and its
:class:`~tasks.engine.runner.ModelRunner`, and scored against its labels pooled over all regions
(Dice per foreground class from summed intersections and sizes, not a mean of patch scores).

Memory stays bounded as scans grow: a region larger than ``voxel_budget`` is validated on evenly
spaced slabs along its first axis that together fit the budget (each slab predicted whole,
borders mirrored), so a 10^10-voxel stack validates in the memory of a small one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tasks.training.data import Region, ScanArrays

VOXEL_BUDGET = 1 << 24  # 16 Mi voxels over all regions: a whole BraTS subject (8.9 Mi) or 64 EM sections


@dataclass(frozen=True)
class WholeRegionValidation:
    regions: list[Region]  # what is predicted, already cut to the budget
    tile: tuple[int, ...]  # in the scan's rank (depth 1 first for a 2D model on a 3D scan)
    squeeze: int | None  # the axis a 2D model on a 3D scan drops (ModelRunner's squeeze_axis)
    overlap: float = 0.5
    batch: int = 4

    @property
    def voxels(self) -> int:
        return int(sum(np.prod(r.shape) for r in self.regions))


def within_budget(regions: list[Region], tile: tuple[int, ...], voxel_budget: int = VOXEL_BUDGET) -> list[Region]:
    """The regions themselves when they fit ``voxel_budget``; else each one is cut to evenly spaced
    slabs along axis 0 (at least one tile deep) sharing the budget in proportion to its size."""
    total = sum(int(np.prod(r.shape)) for r in regions)
    if total <= voxel_budget:
        return list(regions)
    out = []
    for region in regions:
        share = voxel_budget * np.prod(region.shape) / total
        per_slice = int(np.prod(region.shape[1:]))
        depth = max(int(tile[0]), 1)
        slabs = max(1, int(share // (per_slice * depth)))
        first = region.box[0]
        size = first.stop - first.start
        if slabs * depth >= size:
            out.append(region)
            continue
        starts = np.linspace(first.start, first.stop - depth, slabs).round().astype(int)
        for s in sorted(set(starts.tolist())):
            out.append(Region(region.store, (slice(s, s + depth),) + region.box[1:]))
    return out


def predict_region(runner, image: np.ndarray, tile: tuple[int, ...], overlap: float, normalise,
                   batch: int = 4) -> np.ndarray:
    """Class index per voxel of ``image`` (C, *spatial), predicted whole by sliding windows as the
    engine does (even tile placement, mirrored borders, Gaussian weights on the logits)."""
    from tasks.engine.blend import importance_map
    from tasks.engine.plan import plan_tiles
    from tasks.engine.tiles import read_tile

    spatial = image.shape[1:]
    plan = plan_tiles(spatial, tile, overlap, spatial)
    weights = importance_map(tile)
    summed = None
    weight_sum = np.zeros(spatial, np.float32)
    origins = list(plan.tiles())
    for start in range(0, len(origins), batch):
        part = origins[start:start + batch]
        x = normalise(np.stack([read_tile(image, o, tile, "reflect") for o in part]))
        logits = runner(x, where=" (validation)")
        if summed is None:
            summed = np.zeros((logits.shape[1], *spatial), np.float32)
        for origin, tile_logits in zip(part, logits):
            inside = tuple(slice(max(o, 0), min(o + t, n)) for o, t, n in zip(origin, tile, spatial))
            in_tile = tuple(slice(s.start - o, s.stop - o) for s, o in zip(inside, origin))
            w = weights[in_tile]
            summed[(slice(None),) + inside] += tile_logits[(slice(None),) + in_tile] * w
            weight_sum[inside] += w
    if summed.shape[0] == 1:
        return (summed[0] >= 0).astype(np.int64)  # sigmoid(mean logit) >= 0.5, the weights are positive
    return summed.argmax(0)


def validate(network, validation: WholeRegionValidation, arrays: dict[str, ScanArrays], classes: int,
             normalise, device: str = "cpu") -> tuple[list[float], dict[str, np.ndarray]]:
    """Dice per foreground class over all validation regions (NaN where a class is absent in both
    prediction and reference), and the pooled counts behind it."""
    from tasks.engine.runner import ModelRunner

    runner = ModelRunner(network, device=device, squeeze_axis=validation.squeeze)
    inter = np.zeros(classes, np.int64)
    pred_n = np.zeros(classes, np.int64)
    true_n = np.zeros(classes, np.int64)
    whole = np.zeros(3, np.int64)  # any foreground: intersection, predicted, reference
    for region in validation.regions:
        scan = arrays[region.store]
        image = np.asarray(scan.image[(slice(None),) + region.box], dtype=np.float32)
        truth = np.asarray(scan.labels[region.box]).astype(np.int64)
        pred = predict_region(runner, image, validation.tile, validation.overlap, normalise, validation.batch)
        inter += np.bincount(truth[pred == truth].ravel(), minlength=classes)[:classes]
        pred_n += np.bincount(pred.ravel(), minlength=classes)[:classes]
        true_n += np.bincount(truth.ravel(), minlength=classes)[:classes]
        whole += [int(((pred > 0) & (truth > 0)).sum()), int((pred > 0).sum()), int((truth > 0).sum())]
    dice = []
    for k in range(1, classes):
        denom = pred_n[k] + true_n[k]
        dice.append(float(2 * inter[k] / denom) if denom else float("nan"))
    return dice, {"intersection": inter, "predicted": pred_n, "reference": true_n, "foreground": whole}


def foreground_dice(counts: dict[str, np.ndarray]) -> float:
    """Dice of "any foreground class" (e.g. BraTS whole tumour) from :func:`validate`'s counts."""
    inter, pred, ref = counts["foreground"]
    return float(2 * inter / (pred + ref)) if pred + ref else float("nan")

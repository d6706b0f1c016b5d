"""The end-of-training check of the model about to be registered: what it predicts on each
validation scan, and whether it predicts one class everywhere on any of them.

A network can reach a fair pooled validation Dice and still paint one scan all one class (the
pooled score hides it, and a held-out scene unlike the training ones then gets the same): such a
model is registered but never promoted (``train`` warns). The per-scan foreground fractions go
into the model card (``validation_foreground``), where the drift check of ``evaluate`` and the
nightly summary (tasks/metrics/drift.py) compare every later prediction with them.

"One class everywhere" (``degenerate_scans``): one class takes at least ``EVERYWHERE`` of the
scan's predicted voxels while the reference has at least ``OTHER`` of its voxels in other
classes. A tolerance of 0.1 % keeps a model that paints all but a few hundred pixels from passing;
the reference condition keeps a scan that really is one class (a building-free scene predicted
building-free) from being called degenerate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.training.data import ScanArrays

EVERYWHERE = 0.999
OTHER = 0.01


def scan_class_fractions(network, validation, arrays: dict[str, ScanArrays], classes: int, normalise,
                         device: str = "cpu") -> dict[str, dict[str, list[float]]]:
    """Per validation scan (its store's name), the fraction of voxels of each class in the
    reference and in ``network``'s prediction (the engine's tiling, as validation predicts)."""
    from tasks.engine.runner import ModelRunner
    from tasks.training.validation import predict_region

    runner = ModelRunner(network, device=device, squeeze_axis=validation.squeeze)
    counts: dict[str, np.ndarray] = {}
    for region in validation.regions:
        scan = arrays[region.store]
        image = np.asarray(scan.image[(slice(None),) + region.box], dtype=np.float32)
        truth = np.asarray(scan.labels[region.box]).astype(np.int64)
        pred = predict_region(runner, image, validation.tile, validation.overlap, normalise, validation.batch)
        c = counts.setdefault(region.store, np.zeros((2, classes), np.int64))
        c[0] += np.bincount(truth.ravel(), minlength=classes)[:classes]
        c[1] += np.bincount(pred.ravel(), minlength=classes)[:classes]
    return {Path(store).name.removesuffix(".zarr"): {"reference": (c[0] / max(c[0].sum(), 1)).tolist(),
                                                     "predicted": (c[1] / max(c[1].sum(), 1)).tolist()}
            for store, c in counts.items()}


def foreground_fractions(fractions: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """{scan: {"reference": f, "predicted": f}} with f the fraction of any class > 0 (the card's
    ``validation_foreground``)."""
    return {scan: {k: round(float(1.0 - v[0]), 6) for k, v in per.items()} for scan, per in fractions.items()}


def degenerate_scans(fractions: dict[str, dict[str, list[float]]], names: list[str] | None = None) -> list[str]:
    """"scan: all <class>" for each validation scan on which the prediction is one class
    everywhere though the reference is not (module docstring)."""
    found = []
    for scan, per in fractions.items():
        predicted, reference = np.asarray(per["predicted"]), np.asarray(per["reference"])
        top = int(predicted.argmax())
        if predicted[top] >= EVERYWHERE and 1.0 - reference[top] >= OTHER:
            name = names[top] if names and top < len(names) else f"class {top}"
            found.append(f"{scan}: {predicted[top]:.1%} {name} (reference {reference[top]:.1%})")
    return found

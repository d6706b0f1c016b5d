"""Semantic segmentation scores from one streaming confusion matrix.

The confusion matrix ``M`` (K x K, int64) counts pixels with reference class ``i`` (row) and
predicted class ``j`` (column). It is accumulated block by block (``np.bincount`` of
``reference * K + prediction``), so a scan never has to fit in memory, and the sum over blocks is
exactly the one-shot matrix.

From it, the table of the FCN paper (Long, Shelhamer, Darrell, "Fully Convolutional Networks for
Semantic Segmentation", CVPR 2015, section 5), with ``n_ij = M[i, j]`` and ``t_i = sum_j n_ij``:

    pixel accuracy              sum_i n_ii / sum_i t_i
    mean accuracy               (1/n_cl) sum_i n_ii / t_i
    mean IoU                    (1/n_cl) sum_i n_ii / (t_i + sum_j n_ji - n_ii)
    frequency-weighted IoU      (sum_k t_k)^-1 sum_i t_i n_ii / (t_i + sum_j n_ji - n_ii)

and per class Dice ``2 n_ii / (t_i + sum_j n_ji)`` and IoU (Jaccard) ``n_ii / (t_i + sum_j n_ji - n_ii)``.

Conventions (tested in tests/test_metrics.py):

- A class absent from both the reference and the prediction (both masks empty): its IoU and Dice
  are undefined, NaN here (``null`` in JSON), and left out of mean IoU / mean Dice; ``n_cl``
  counts only the classes with a defined value. Its accuracy is NaN too.
- A class present in one of the two only (one mask empty): IoU = Dice = 0, counted in the means.
- Accuracy of a class absent from the reference (``t_i = 0``) is NaN and left out of the mean
  accuracy, whatever was predicted (the false positives still lower the other scores).
- Frequency-weighted IoU weighs classes by ``t_i``, so absent classes weigh 0.
- Class values outside [0, K) in the reference or the prediction raise ``ValueError`` naming the
  values; floating-point input with NaN raises ``ValueError`` (labels must be class indices).
- An empty matrix (no pixel at all) gives NaN everywhere.
"""

from __future__ import annotations

import math

import numpy as np


def _as_indices(values: np.ndarray, classes: int, what: str) -> np.ndarray:
    values = np.asarray(values)
    if np.issubdtype(values.dtype, np.floating):
        if np.isnan(values).any():
            raise ValueError(f"{what} contains NaN; class indices are expected")
        if not np.all(np.mod(values, 1) == 0):
            raise ValueError(f"{what} contains non-integer values; class indices are expected")
    elif not (np.issubdtype(values.dtype, np.integer) or values.dtype == bool):
        raise ValueError(f"{what} has dtype {values.dtype}; class indices are expected")
    flat = values.ravel()
    if flat.size and (flat.min() < 0 or flat.max() >= classes):
        bad = np.unique(flat[(flat < 0) | (flat >= classes)])
        shown = ", ".join(str(int(v)) for v in bad[:10]) + (" ..." if len(bad) > 10 else "")
        raise ValueError(f"{what} has values {shown} outside the class indices 0..{classes - 1}")
    return flat.astype(np.int64, copy=False)


class ConfusionMatrix:
    """Streaming K x K confusion matrix: rows the reference class, columns the predicted class."""

    def __init__(self, classes: int):
        if classes < 1:
            raise ValueError(f"need at least one class, got {classes}")
        self.classes = int(classes)
        self.matrix = np.zeros((classes, classes), dtype=np.int64)

    def update(self, reference: np.ndarray, prediction: np.ndarray) -> "ConfusionMatrix":
        """Add one block: two arrays of class indices of the same shape (any axis order)."""
        reference, prediction = np.asarray(reference), np.asarray(prediction)
        if reference.shape != prediction.shape:
            raise ValueError(f"reference shape {reference.shape} != prediction shape {prediction.shape}")
        k = self.classes
        ref = _as_indices(reference, k, "reference")
        pred = _as_indices(prediction, k, "prediction")
        self.matrix += np.bincount(ref * k + pred, minlength=k * k).reshape(k, k)
        return self

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        if other.classes != self.classes:
            raise ValueError(f"cannot merge {other.classes} classes into {self.classes}")
        self.matrix += other.matrix
        return self

    @property
    def pixels(self) -> int:
        return int(self.matrix.sum())


def per_class_scores(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class arrays (length K): ``iou``, ``dice``, ``accuracy`` (recall), ``reference`` (t_i)
    and ``predicted`` (sum_j n_ji) pixel counts. NaN where undefined (module docstring)."""
    m = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(m)
    ref = m.sum(axis=1)
    pred = m.sum(axis=0)
    union = ref + pred - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        dice = np.where(ref + pred > 0, 2 * tp / (ref + pred), np.nan)
        accuracy = np.where(ref > 0, tp / ref, np.nan)
    return {"iou": iou, "dice": dice, "accuracy": accuracy,
            "reference": ref.astype(np.int64), "predicted": pred.astype(np.int64)}


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


def fcn_scores(matrix: np.ndarray) -> dict[str, float]:
    """The FCN paper's table (Long et al. 2015) plus mean Dice, from a K x K confusion matrix."""
    m = np.asarray(matrix, dtype=np.float64)
    total = m.sum()
    per = per_class_scores(m)
    ref = per["reference"].astype(np.float64)
    if total == 0:
        return {k: math.nan for k in ("pixel_accuracy", "mean_accuracy", "mean_iou", "frequency_weighted_iou",
                                      "mean_dice")}
    fw = float(np.nansum(np.where(ref > 0, ref * per["iou"], 0.0)) / total)
    return {
        "pixel_accuracy": float(np.trace(m) / total),
        "mean_accuracy": _nanmean(per["accuracy"]),
        "mean_iou": _nanmean(per["iou"]),
        "frequency_weighted_iou": fw,
        "mean_dice": _nanmean(per["dice"]),
    }


def semantic_report(matrix: np.ndarray, class_names: list[str]) -> dict:
    """JSON-able: the FCN table, per-class Dice/IoU/accuracy/pixel counts, and the matrix itself.
    Undefined values are ``None`` (JSON ``null``)."""
    per = per_class_scores(matrix)
    if len(class_names) != len(per["iou"]):
        raise ValueError(f"{len(class_names)} class names for a {len(per['iou'])}-class matrix")
    return {
        **{k: json_float(v) for k, v in fcn_scores(matrix).items()},
        "per_class": {
            name: {"dice": json_float(per["dice"][i]), "iou": json_float(per["iou"][i]),
                   "accuracy": json_float(per["accuracy"][i]),
                   "reference_pixels": int(per["reference"][i]), "predicted_pixels": int(per["predicted"][i])}
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": np.asarray(matrix).astype(np.int64).tolist(),
        "confusion_matrix_axes": "rows: reference class, columns: predicted class",
    }


def region_scores(matrix: np.ndarray, regions: dict[str, list[int]]) -> dict:
    """Dice and IoU of unions of classes (BraTS' whole tumour, tumour core, enhancing tumour: the
    challenge scores these regions, not the single labels). A region is the set of voxels whose
    class is in it; its counts come from the confusion matrix (rows: reference, columns: predicted)
    without another pass. Undefined (no voxel of the region on either side) is ``None``."""
    m = np.asarray(matrix, dtype=np.float64)
    out = {}
    for name, members in regions.items():
        inside = np.zeros(m.shape[0], dtype=bool)
        inside[list(members)] = True
        both = m[np.ix_(inside, inside)].sum()
        reference, predicted = m[inside].sum(), m[:, inside].sum()
        union = reference + predicted - both
        out[name] = {"dice": json_float(2 * both / (reference + predicted)) if reference + predicted else None,
                     "iou": json_float(both / union) if union else None,
                     "reference_pixels": int(reference), "predicted_pixels": int(predicted)}
    return out


def json_float(value: float) -> float | None:
    """NaN and +-inf are not JSON: they become ``None`` (each metric's docstring says what null means)."""
    value = float(value)
    return value if math.isfinite(value) else None

"""What an export reads: a complete scan group with a complete prediction, checked once.

Arrays stay lazy Zarr arrays; exporters read them chunk row by chunk row (``slabs``), so memory is
one chunk row of the labels or of one class's probabilities, never the scan. Axis order is the
store's: (Z, Y, X) for volumes, (Y, X) for rasters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import zarr

from tasks import identity, storage
from tasks.errors import ScanError


@dataclass
class ExportSource:
    url: str
    record: dict[str, Any]  # the scan group's attrs["tilewise"]
    prediction: dict[str, Any]  # prediction/ attrs["tilewise"]
    labels: zarr.Array  # prediction/labels, (*spatial) uint8
    probabilities: zarr.Array | None  # prediction/probabilities, (K, *spatial); None from an instance model
    classes: list[str]

    @property
    def spatial(self) -> dict[str, Any]:
        return dict(self.record.get("spatial") or {})

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.labels.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def store_digest(self) -> str:
        """The scan's identity: its sources' content in order and the ingest options (tasks/identity.py)."""
        return identity.scan_content(self.record)

    def prediction_digest(self) -> str:
        """The prediction's identity: the engine's digest (model + parameters), the calibrator and
        the time its completion mark was written (a re-run that replaced it changes this)."""
        done = self.prediction.get(storage.COMPLETE_KEY) or {}
        return identity.digest({"digest": self.prediction.get("digest"), "calibrator": self.prediction.get("calibrator"),
                                "completed_at": done.get("at")})


def open_source(store: str) -> ExportSource:
    """Open ``store`` for export; :class:`ScanError` naming what is missing otherwise."""
    store = str(store).rstrip("/")
    if not storage.exists(store):
        raise ScanError(store, "does not exist")
    if not storage.is_complete(store):
        raise ScanError(store, "is not a complete scan group (no completion mark): ingest it first")
    group = storage.open_group(store, mode="r")
    record = dict(group.attrs.get(storage.ATTRS_KEY, {}))
    pred = storage.read_record(f"{store}/prediction")
    if pred is None:
        raise ScanError(store, "has no prediction: run tilewise infer first")
    if not pred.get(storage.COMPLETE_KEY):
        raise ScanError(store, "prediction is incomplete (no completion mark): run tilewise infer again to finish it")
    try:
        labels = group["prediction/labels"]
        # an instance model's prediction has class labels and instances, no probabilities; nor has
        # one inferred with --outputs labels
        no_probabilities = pred.get("mode") == "instances" or pred.get("outputs") == ["labels"]
        probabilities = None if no_probabilities else group["prediction/probabilities"]
    except KeyError as exc:
        raise ScanError(store, f"prediction lacks the array {exc}") from None
    spatial = tuple(group["image/0"].shape[1:])
    if tuple(labels.shape) != spatial or (probabilities is not None and tuple(probabilities.shape[1:]) != spatial):
        raise ScanError(store, f"prediction shape {tuple(labels.shape)} differs from the image's {spatial}")
    classes = list(pred.get("classes") or [f"class_{k}" for k in range(probabilities.shape[0])])
    return ExportSource(store, record, pred, labels, probabilities, classes)


def slabs(array: zarr.Array, axis: int = 0, step: int | None = None) -> Iterator[tuple[int, int]]:
    """Half-open ranges along ``axis`` of one chunk row each (or ``step``)."""
    step = step or array.chunks[axis]
    n = array.shape[axis]
    for start in range(0, n, step):
        yield start, min(start + step, n)


def finite_or_fail(block: np.ndarray, store: str, where: str) -> np.ndarray:
    """``block`` unchanged, or :class:`ScanError` if it holds NaN (a broken model or a broken chunk)."""
    if np.issubdtype(block.dtype, np.floating) and np.isnan(block).any():
        raise ScanError(store, f"prediction/probabilities contains NaN ({where}); refusing to export it")
    return block

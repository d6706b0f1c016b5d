"""What an export reads: a complete scan group with a complete prediction, checked once.

Arrays stay lazy Zarr arrays; exporters read them chunk row by chunk row (``slabs``), so memory is
one chunk row of the labels or of one class's probabilities, never the scan. Axis order is the
store's: (Z, Y, X) for volumes, (Y, X) for rasters.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
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
    shape: tuple[int, ...]  # the spatial shape, of the labels and the image
    has_probabilities: bool  # False for an instance model's prediction or one inferred with --outputs labels
    classes: list[str]

    @cached_property
    def labels(self) -> zarr.Array:
        """prediction/labels, (*spatial) uint8: opened on first use (an unchanged export opens no array)."""
        return storage.open_group(self.url, mode="r")["prediction/labels"]

    @cached_property
    def probabilities(self) -> zarr.Array | None:
        """prediction/probabilities, (K, *spatial); None without them."""
        return storage.open_group(self.url, mode="r")["prediction/probabilities"] if self.has_probabilities else None

    @property
    def spatial(self) -> dict[str, Any]:
        return dict(self.record.get("spatial") or {})

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
    record = storage.complete_record(store)
    if record is None:
        raise ScanError(store, "is not a complete scan group (no completion mark): ingest it first")
    pred = storage.read_record(f"{store}/prediction")
    if pred is None:
        raise ScanError(store, "has no prediction: run tilewise infer first")
    if not pred.get(storage.COMPLETE_KEY):
        raise ScanError(store, "prediction is incomplete (no completion mark): run tilewise infer again to finish it")
    # an instance model's prediction has class labels and instances, no probabilities; nor has
    # one inferred with --outputs labels
    no_probabilities = pred.get("mode") == "instances" or pred.get("outputs") == ["labels"]
    shapes = {}  # metadata only: the arrays themselves are opened when an export reads them
    for path in ("image/0", "prediction/labels") + (() if no_probabilities else ("prediction/probabilities",)):
        shapes[path] = storage.array_shape(f"{store}/{path}")
        if shapes[path] is None:
            raise ScanError(store, f"{'prediction ' if path.startswith('prediction/') else ''}lacks the array '{path}'")
    spatial = shapes["image/0"][1:]
    labels_shape, prob_shape = shapes["prediction/labels"], shapes.get("prediction/probabilities")
    if labels_shape != spatial or (prob_shape is not None and prob_shape[1:] != spatial):
        raise ScanError(store, f"prediction shape {labels_shape} differs from the image's {spatial}")
    classes = list(pred.get("classes") or [f"class_{k}" for k in range(prob_shape[0])])
    return ExportSource(store, record, pred, spatial, not no_probabilities, classes)


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

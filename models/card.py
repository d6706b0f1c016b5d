"""The model card: what travels with every model so that nobody repeats it by hand.

Architecture and its arguments (to rebuild the network from a state dict), input channels and their
order, classes and the label mapping, tile size, intensity normalisation, and the spacing /
resolution it was trained at. Stored as JSON beside a TorchScript file or as an MLflow artifact
with each registered model version.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class Normalization(BaseModel):
    """Per-channel intensity normalisation applied to every tile before the model.

    ``none``; ``zscore``: (x - mean) / std with the card's values; ``minmax``: (x - low) / (high - low).

    ``scan_percentile`` is per scan: ``low`` and ``high`` are each channel's ``percentiles`` of the
    *scan being predicted* (of the training scan, in training), so a scene brighter or of another
    colour balance than the training scenes reaches the network with the same range (SpaceNet Rio:
    a chip brighter than every training chip was all "building" under the training set's z-score).
    The card holds only the percentiles; :meth:`for_scan` makes the ``minmax`` normalisation of one
    scan from its statistics (``tasks/engine/scan_stats.py`` computes them once per scan, the
    same way for training and inference).
    """

    model_config = ConfigDict(extra="forbid")
    kind: Literal["none", "zscore", "minmax", "scan_percentile"] = "none"
    mean: list[float] | None = None
    std: list[float] | None = None
    low: list[float] | None = None
    high: list[float] | None = None
    percentiles: list[float] | None = None  # scan_percentile: [low, high], e.g. [1, 99]

    @property
    def per_scan(self) -> bool:
        """True when the values come from each scan (they are not in the card)."""
        return self.kind == "scan_percentile"

    def for_scan(self, low: list[float], high: list[float]) -> "Normalization":
        """The normalisation of one scan whose channels have ``low`` and ``high`` percentiles. A
        channel with no spread (a constant scan: all nodata) keeps a unit range, so it maps to 0
        instead of dividing by zero."""
        high = [h if h > lo else lo + 1.0 for lo, h in zip(low, high)]
        return Normalization(kind="minmax", low=[float(v) for v in low], high=[float(v) for v in high])

    def apply(self, batch: np.ndarray, inplace: bool = False) -> np.ndarray:
        """``batch`` is (B, C, *spatial) float32; returns it normalised (overwritten with ``inplace``,
        for a batch its caller made for this: the same values, no new arrays)."""
        if self.kind == "none":
            return batch
        if self.per_scan:
            raise ValueError("a per-scan normalisation (scan_percentile) needs the scan's statistics: apply "
                             "Normalization.for_scan(...) of the scan (tasks.engine.scan_stats)")
        shape = (1, -1) + (1,) * (batch.ndim - 2)
        if self.kind == "zscore":
            shift = np.asarray(self.mean, np.float32).reshape(shape)
            scale = np.asarray(self.std, np.float32).reshape(shape)
        else:
            shift = np.asarray(self.low, np.float32).reshape(shape)
            scale = np.asarray(self.high, np.float32).reshape(shape) - shift
        if not inplace or batch.dtype != np.float32:
            return (batch - shift) / scale
        np.subtract(batch, shift, out=batch)  # the same two float32 operations
        return np.divide(batch, scale, out=batch)


class ModelCard(BaseModel):
    """Everything optional, so a hand-written card for a TorchScript file may say only what it knows.
    Cards written by training fill every field."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())
    architecture: str | None = None  # a models.zoo builder name: unet, deeplab, maskrcnn
    architecture_args: dict[str, Any] = Field(default_factory=dict)
    in_channels: int | None = Field(default=None, ge=1)
    channel_names: list[str] | None = None
    classes: list[str] | None = None
    label_mapping: dict[int, int] | None = None  # value in the dataset's label files -> class index
    spatial_dims: Literal[2, 3] | None = None
    tile: list[int] | None = None
    normalization: Normalization = Normalization()
    spacing: list[float] | None = None  # pixel size of the training data, array order
    unit: str | None = None
    modality: str | None = None
    dataset: str | None = None
    metric: dict[str, float] | None = None  # validation metric of this model: {"name": value}
    # Foreground fraction (any class > 0) of each validation scan, {scan: {"reference": f, "predicted": f}}:
    # what the model saw when it was chosen; a prediction far outside it is flagged (tasks/metrics/drift.py)
    validation_foreground: dict[str, dict[str, float]] | None = None




@dataclass
class LoadedModel:
    """A network ready for inference, its card, and what outputs record as "the model"."""

    module: Any  # torch.nn.Module in eval mode
    card: ModelCard
    identity: str
    calibrator: dict | None = None  # the version's calibrator (tilewise/calibrator.json), if fitted

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
    """

    model_config = ConfigDict(extra="forbid")
    kind: Literal["none", "zscore", "minmax"] = "none"
    mean: list[float] | None = None
    std: list[float] | None = None
    low: list[float] | None = None
    high: list[float] | None = None

    def apply(self, batch: np.ndarray) -> np.ndarray:
        """``batch`` is (B, C, *spatial) float32; returns it normalised (in place where possible)."""
        if self.kind == "none":
            return batch
        shape = (1, -1) + (1,) * (batch.ndim - 2)
        if self.kind == "zscore":
            mean = np.asarray(self.mean, np.float32).reshape(shape)
            std = np.asarray(self.std, np.float32).reshape(shape)
            return (batch - mean) / std
        low = np.asarray(self.low, np.float32).reshape(shape)
        high = np.asarray(self.high, np.float32).reshape(shape)
        return (batch - low) / (high - low)


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




@dataclass
class LoadedModel:
    """A network ready for inference, its card, and what outputs record as "the model"."""

    module: Any  # torch.nn.Module in eval mode
    card: ModelCard
    identity: str
    calibrator: dict | None = None  # the version's calibrator (tilewise/calibrator.json), if fitted

"""Loading a model for the engine: a TorchScript file, with or without a JSON model card beside it.

The card (``<model file>.json``, or ``model_card.json`` in the same folder) carries what a user
should never have to repeat by hand: input channels and their order, class names, intensity
normalisation, tile size and the model's spatial rank. Without a card the engine takes the input
channels from the store, the classes from the model's output and applies no normalisation.
Registry URIs (``models:/NAME@ALIAS``) are resolved by ``models.registry`` (model-zoo issue).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tasks.errors import ScanError


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
    """What the engine needs to know about a model; the training issue writes richer cards."""

    model_config = ConfigDict(extra="allow")
    in_channels: int | None = Field(default=None, ge=1)
    channel_names: list[str] | None = None
    classes: list[str] | None = None
    spatial_dims: Literal[2, 3] | None = None
    tile: list[int] | None = None
    normalization: Normalization = Normalization()


@dataclass
class LoadedModel:
    module: Any  # torch.nn.Module
    card: ModelCard
    identity: str  # what the output records as "the model": a URI plus a content digest


def card_path(model_path: Path) -> Path | None:
    for candidate in (model_path.with_name(model_path.name + ".json"), model_path.with_suffix(".json"),
                      model_path.parent / "model_card.json"):
        if candidate.is_file():
            return candidate
    return None


def load_model(uri: str) -> LoadedModel:
    """Load ``uri``: a local TorchScript file, or a registry URI (``models:/...``)."""
    if uri.startswith("models:/"):
        from models.registry import load_registered  # the model-zoo issue; imported only when asked

        return load_registered(uri)
    import torch

    path = Path(uri)
    if not path.is_file():
        raise ScanError(uri, "model file does not exist")
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ScanError(uri, f"not a TorchScript model ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    module.eval()
    card = ModelCard()
    cpath = card_path(path)
    if cpath is not None:
        try:
            card = ModelCard.model_validate_json(cpath.read_text())
        except Exception as exc:
            raise ScanError(cpath, f"invalid model card ({str(exc).splitlines()[0]})") from None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return LoadedModel(module=module, card=card, identity=f"file:{path.resolve()}#sha256:{digest}")

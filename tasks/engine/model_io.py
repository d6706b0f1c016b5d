"""Loading a model for the engine: a TorchScript file, with or without a JSON model card beside it,
or a registry URI (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``).

The card file is ``<model file>.json`` (e.g. ``unet.pt.json``), ``<model stem>.json``, or
``model_card.json`` in the same folder. Without a card the engine takes the input channels from
the store, the classes from the model's output and applies no normalisation.

The model's identity (what a prediction records and its digest includes) is the file's sha256 and
the card's content: editing the card recomputes, moving the files does not.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from models.card import LoadedModel, ModelCard, Normalization  # noqa: F401  (re-exported)
from tasks.errors import ScanError
from tasks.identity import model_file_identity


def card_path(model_path: Path) -> Path | None:
    for candidate in (model_path.with_name(model_path.name + ".json"), model_path.with_suffix(".json"),
                      model_path.parent / "model_card.json"):
        if candidate.is_file():
            return candidate
    return None


def load_model(uri: str) -> LoadedModel:
    """Load ``uri``: a local TorchScript file, or a registry URI (``models:/...``)."""
    if uri.startswith("models:/"):
        from models.registry import RegistryError, load_registered

        try:
            return load_registered(uri)
        except RegistryError as exc:
            raise ScanError(uri, str(exc)) from None
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
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    written = card.model_dump(mode="json") if cpath is not None else None
    return LoadedModel(module=module, card=card, identity=model_file_identity(digest, written))

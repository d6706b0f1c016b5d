"""The MLflow model tilewise logs: an MLflow "models from code" pyfunc, so nothing is pickled.

MLflow copies this file into the logged model and runs it on ``mlflow.pyfunc.load_model``; the
model's artifacts are tilewise's own two files, stored once:

    artifacts/weights.safetensors   the network's state dict (safetensors: tensors only, no code)
    artifacts/card.json             the model card (architecture, classes, normalization, ...)

``load_context`` rebuilds the network from the card (models/zoo.py) and loads the tensors, exactly
as ``models.registry.load_registered`` does, so MLflow's tools (``mlflow.pyfunc.load_model(uri)
.predict(x)``, ``mlflow models serve``) and tilewise read the same bytes. ``predict`` takes a float32
array (B, C, *spatial), axes (Z, Y, X) or (Y, X), already normalised as the card says, and returns
the network's logits (B, K, *spatial) as float32 -- for Mask R-CNN the semantic wrapper's
log-probabilities (models/maskrcnn.py ``MaskRCNNSemantic``). Loading needs tilewise importable
(``models`` package) in the serving environment.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

WEIGHTS_KEY, CARD_KEY = "weights", "card"  # keys of the logged model's ``artifacts``


class TilewiseModel(PythonModel):
    """A tilewise network behind MLflow's pyfunc interface."""

    def load_context(self, context) -> None:
        from safetensors.torch import load_file

        from models.card import ModelCard
        from models.zoo import build_from_card, inference_module

        card = ModelCard.model_validate_json(Path(context.artifacts[CARD_KEY]).read_text())
        network = build_from_card(card)
        network.load_state_dict(load_file(context.artifacts[WEIGHTS_KEY]), strict=True)
        self.card = card
        self.module = inference_module(card, network).eval()

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        """(B, C, *spatial) float32 in -> (B, K, *spatial) float32 logits out. The hint is one MLflow
        takes without inferring a schema from it: the logged signature (free batch and tile sizes)
        describes the tensors."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(np.asarray(model_input, dtype=np.float32)))
        with torch.no_grad():
            return self.module(x).float().cpu().numpy()


mlflow.models.set_model(TilewiseModel())

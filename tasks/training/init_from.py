"""Fine-tuning: start a training from other weights (``tilewise train --init-from``).

The source is a registered model version (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``, read as
its safetensors state dict) or a user's weights file: ``.safetensors``, or a plain PyTorch state dict
loaded with ``torch.load(weights_only=True)`` (a checkpoint that wraps it under ``state_dict`` or
``model`` is unwrapped; a ``module.`` prefix of DataParallel is dropped). A pickle that needs more
than tensors to load is refused, never executed.

Tensors whose name and shape match the new network are loaded; the others -- a head with other
classes, a first layer with other input channels -- keep their fresh initialisation and are
listed. A registered DeepLab may start a Mask R-CNN (ResNet-FPN backbone) of the same data: its
ResNet encoder is renamed onto the detector's backbone (:func:`deeplab_encoder_as_backbone`), the
detector keeps its own architecture arguments. Everything is checked before any epoch runs.
``--freeze encoder`` names the encoder of each architecture (:func:`encoder_modules`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tasks.training.data import TrainingError

FREEZABLE = ("encoder",)


@dataclass
class InitialWeights:
    source: str  # as the user gave it
    resolved: str  # models:/NAME/VERSION, or the file's absolute path
    state: dict
    architecture: str | None = None  # a registered parent's; a file does not say
    architecture_args: dict | None = None
    sha256: str | None = None  # of a file


@dataclass
class InitReport:
    source: str
    resolved: str
    loaded: list[str]
    initialised: dict[str, str]  # name -> why (shape differs, not in the source)
    unused: list[str]  # in the source, not in the network
    sha256: str | None = None
    total: int = field(default=0)

    def summary(self) -> str:
        text = f"loaded {len(self.loaded)} of {self.total} tensors from {self.resolved}"
        if self.initialised:
            text += "; initialised: " + ", ".join(f"{k} ({v})" for k, v in self.initialised.items())
        if self.unused:
            text += f"; {len(self.unused)} source tensors unused"
        return text

    def record(self) -> dict:
        return {"source": self.source, "resolved": self.resolved, "sha256": self.sha256, "loaded": self.loaded,
                "initialised": self.initialised, "unused": self.unused}


def read_initial_weights(source: str, architecture: str) -> InitialWeights:
    """The weights ``source`` names, checked: TrainingError (one line) when they cannot be used."""
    if source.startswith("models:/"):
        from models.registry import RegistryError, registered_weights

        try:
            card, state, identity, _ = registered_weights(source)
        except RegistryError as exc:
            raise TrainingError(f"--init-from {source}: {exc}") from None
        if (card.architecture, architecture) == ("deeplab", "maskrcnn"):
            # a semantic champion of the same data: its ResNet encoder becomes the detector's backbone
            return InitialWeights(source, identity, deeplab_encoder_as_backbone(state), card.architecture, None)
        if card.architecture != architecture:
            raise TrainingError(f"--init-from {source}: a {card.architecture} model; this training builds a "
                                f"{architecture} (architecture mismatch)")
        return InitialWeights(source, identity, dict(state), card.architecture, dict(card.architecture_args))
    path = Path(source).expanduser()
    if not path.is_file():
        raise TrainingError(f"{source}: --init-from: no such file or registered model (models:/NAME@ALIAS)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:
            raise TrainingError(f"{source}: not a safetensors file ({_first_line(exc)})") from None
    else:
        import pickle

        import torch

        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "weights only" in str(exc).lower() or "weights_only" in str(exc):
                raise TrainingError(f"{source}: refused: the pickle holds more than weights (objects or code "
                                    "that would run on load); save model.state_dict() or safetensors") from None
            raise TrainingError(f"{source}: not a PyTorch weights file ({_first_line(exc)})") from None
        except Exception as exc:
            raise TrainingError(f"{source}: not a PyTorch weights file ({_first_line(exc)})") from None
    return InitialWeights(source, str(path.resolve()), _state_dict(state, source), sha256=digest)


def deeplab_encoder_as_backbone(state: Mapping) -> dict:
    """A DeepLab's ResNet encoder (``stem.0`` = conv1, ``stem.1`` = bn1, ``layer1``-``layer4``;
    models/deeplab.py) under the names of a ResNet-FPN Mask R-CNN's backbone body
    (``backbone.body.conv1`` ...; models/maskrcnn.py). Its ASPP and decoder have no counterpart and
    are left out. The tensors keep their shapes; the DeepLab's last stages are dilated where the
    detector's stride, so the filters are a starting point, not the same function."""
    names = {"stem.0.": "backbone.body.conv1.", "stem.1.": "backbone.body.bn1.",
             **{f"layer{i}.": f"backbone.body.layer{i}." for i in range(1, 5)}}
    out = {}
    for key, tensor in state.items():
        for old, new in names.items():
            if key.startswith(old):
                out[new + key[len(old):]] = tensor
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _state_dict(obj, source: str) -> dict:
    import torch

    for key in ("state_dict", "model", "model_state_dict"):  # common checkpoint wrappers
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise TrainingError(f"{source}: not a state dict (a {type(obj).__name__}; expected a mapping of layer "
                            "names to tensors)")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise TrainingError(f"{source}: not a state dict ({len(bad)} entries are not name -> tensor, e.g. "
                            f"{str(bad[0])[:60]!r})")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def apply_initial_weights(network, initial: InitialWeights) -> InitReport:
    """Load the tensors of ``initial`` whose name and shape match ``network``; list the rest. No
    match at all is an architecture mismatch (TrainingError)."""
    own = network.state_dict()
    loaded, initialised, merged = [], {}, dict(own)
    for name, tensor in own.items():
        theirs = initial.state.get(name)
        if theirs is None:
            initialised[name] = "not in the source"
        elif tuple(theirs.shape) != tuple(tensor.shape):
            initialised[name] = f"shape {tuple(theirs.shape)} there, {tuple(tensor.shape)} here"
        else:
            merged[name] = theirs.to(tensor.dtype)
            loaded.append(name)
    if not loaded:
        raise TrainingError(f"{initial.source}: no tensor's name and shape matches the network being trained "
                            f"(architecture mismatch; e.g. {next(iter(initial.state))!r})")
    network.load_state_dict(merged, strict=True)
    unused = sorted(set(initial.state) - set(own))
    return InitReport(initial.source, initial.resolved, loaded, initialised, unused, initial.sha256, len(own))


def encoder_modules(architecture: str, network) -> list:
    """The modules ``--freeze encoder`` freezes: DeepLab's ResNet (stem, layer1-4), the U-Net's
    contracting path and bottom block, Mask R-CNN's backbone body (not the FPN, heads or decoder)."""
    if architecture == "deeplab":
        return [network.stem, network.layer1, network.layer2, network.layer3, network.layer4]
    if architecture == "maskrcnn":
        return [network.backbone.body]
    if architecture == "unet":
        from monai.networks.layers.simplelayers import SkipConnection
        from torch import nn

        out, block = [], network.model
        while True:  # model = Sequential(down, SkipConnection(submodule), up), submodule recursive
            out.append(block[0])
            inner = block[1].submodule if isinstance(block[1], SkipConnection) else block[1]
            if isinstance(inner, nn.Sequential) and len(inner) == 3 and isinstance(inner[1], SkipConnection):
                block = inner
                continue
            out.append(inner)  # the bottom block
            return out
    raise TrainingError(f"--freeze encoder: no encoder is defined for {architecture}")

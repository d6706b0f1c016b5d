"""Builders by name, and rebuilding a network from its model card (no pickles involved)."""

from __future__ import annotations

from models.card import ModelCard

ARCHITECTURES = ("unet", "deeplab", "maskrcnn")
INSTANCE_ARCHITECTURES = ("maskrcnn",)  # they find objects (tasks/instances/detect.py), not pixel classes


def is_instance_architecture(architecture: str | None) -> bool:
    return architecture in INSTANCE_ARCHITECTURES


def build(architecture: str, spatial_dims: int, in_channels: int, out_channels: int, **args):
    """A fresh network with random weights. ``out_channels`` counts classes (background included)."""
    if architecture == "unet":
        from models.unet import build_unet

        return build_unet(spatial_dims, in_channels, out_channels, **args)
    if spatial_dims != 2:
        raise ValueError(f"{architecture} is 2D only; got spatial_dims={spatial_dims}")
    if architecture == "deeplab":
        from models.deeplab import build_deeplab

        return build_deeplab(in_channels, out_channels, **args)
    if architecture == "maskrcnn":
        from models.maskrcnn import build_maskrcnn

        return build_maskrcnn(in_channels, out_channels, **args)
    raise ValueError(f"unknown architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}")


def build_from_card(card: ModelCard):
    if not (card.architecture and card.in_channels and card.classes and card.spatial_dims):
        raise ValueError("the model card lacks architecture, in_channels, classes or spatial_dims")
    return build(card.architecture, card.spatial_dims, card.in_channels, len(card.classes),
                 **card.architecture_args)


def inference_module(card: ModelCard, network):
    """What the engine calls: the network itself, or for Mask R-CNN its semantic wrapper."""
    if card.architecture == "maskrcnn":
        from models.maskrcnn import MaskRCNNSemantic

        return MaskRCNNSemantic(network, len(card.classes))
    return network.eval()

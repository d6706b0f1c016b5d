"""Mask R-CNN (He et al., ICCV 2017) from torchvision, built with ``weights=None``.

``backbone="mobilenet_v3"`` (default, light enough to train on a CPU) or ``"resnet50"``
(torchvision's reference FPN). Classes come from the catalog: class 0 is background.

A loaded Mask R-CNN runs in instance mode (tasks/instances/detect.py uses ``.detector``: tiles,
merged objects, ``prediction/instances``). :class:`MaskRCNNSemantic` also turns its detections into
per-class log-probabilities (the highest mask probability x score of any instance of that class at
each pixel); the MLflow pyfunc (models/pyfunc_model.py) serves that view.
"""

from __future__ import annotations

import torch
from torch import nn


def build_maskrcnn(in_channels: int, out_channels: int, *, backbone: str = "mobilenet_v3",
                   min_size: int = 256, max_size: int = 512, trainable_layers: int = 6):
    """``out_channels`` is the number of classes including background."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    # Trained from scratch: BatchNorm must learn (FrozenBatchNorm2d is for pretrained weights).
    norm = nn.BatchNorm2d
    if backbone == "mobilenet_v3":
        body = mobilenet_backbone(backbone_name="mobilenet_v3_large", weights=None, fpn=True,
                                  trainable_layers=trainable_layers, norm_layer=norm)
        sizes = ((16, 32, 64, 128, 256),) * 3
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    elif backbone == "resnet50":
        body = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=5, norm_layer=norm)
        anchors = None
    else:
        raise ValueError(f"unknown Mask R-CNN backbone {backbone!r}")
    del FrozenBatchNorm2d
    mean = [0.0] * in_channels
    std = [1.0] * in_channels  # the card's normalisation runs before the model
    if in_channels != 3:
        first = body.body["0"][0] if backbone == "mobilenet_v3" else body.body.conv1
        replacement = nn.Conv2d(in_channels, first.out_channels, first.kernel_size, first.stride,
                                first.padding, bias=first.bias is not None)
        if backbone == "mobilenet_v3":
            body.body["0"][0] = replacement
        else:
            body.body.conv1 = replacement
    kwargs = dict(min_size=min_size, max_size=max_size, image_mean=mean, image_std=std)
    if anchors is not None:
        kwargs["rpn_anchor_generator"] = anchors
    return MaskRCNN(body, num_classes=out_channels, **kwargs)


class MaskRCNNSemantic(nn.Module):
    """(B, C, H, W) -> (B, K, H, W) logits from a Mask R-CNN's instances (eval mode)."""

    def __init__(self, detector: nn.Module, num_classes: int, score_threshold: float = 0.5):
        super().__init__()
        self.detector = detector.eval()
        self.num_classes = num_classes
        self.score_threshold = score_threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = self.detector(list(x))
        b, _, h, w = x.shape
        probs = torch.zeros(b, self.num_classes, h, w, device=x.device)
        for i, det in enumerate(outputs):
            keep = det["scores"] >= self.score_threshold
            for mask, label, score in zip(det["masks"][keep], det["labels"][keep], det["scores"][keep]):
                probs[i, label] = torch.maximum(probs[i, label], mask[0] * score)
        probs[:, 0] = 1 - probs[:, 1:].amax(dim=1) if self.num_classes > 1 else 1 - probs[:, 0]
        p = probs.clamp(1e-4, 1 - 1e-4)
        return torch.log(p)  # log-probabilities: softmax in the engine gives p renormalised

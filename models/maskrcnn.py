"""Mask R-CNN (He et al., ICCV 2017) from torchvision, built with ``weights=None``.

Backbones (``backbone``):

- ``"resnet18"`` / ``"resnet34"``: a torchvision ResNet with an FPN over all four stages (strides
  4-32, plus the max-pooled level 64), GroupNorm throughout when ``norm="group"`` (Wu & He, ECCV
  2018: batch statistics of 2-4 tiles are noise; He et al., "Rethinking ImageNet Pre-training",
  ICCV 2019, train Mask R-CNN from scratch with GroupNorm), a narrower FPN and lighter heads so it
  trains on a CPU. Its ``body`` has the ResNet's names (``conv1``, ``bn1``, ``layer1``-``layer4``),
  which is what lets a semantic DeepLab's encoder initialise it (tasks/training/init_from.py).
  ``tasks.training.train.ARCHITECTURE_ARGS`` builds this one.
- ``"mobilenet_v3"`` (the builder's default, so cards written without arguments rebuild what they
  were trained with) and ``"resnet50"`` (torchvision's reference FPN).

``anchor_sizes`` (one size per FPN level, in pixels) should span the objects at the data's pixel
size (tasks/training/instances.py measures them on the training labels). ``keep_scale``: the
tiles go in at their own size (torchvision's transform would otherwise rescale every image to
``min_size``, so a whole 406x438 chip and a 256x256 tile would see objects at different scales).

Classes come from the catalog: class 0 is background.

A loaded Mask R-CNN runs in instance mode (tasks/instances/detect.py uses ``.detector``: tiles,
merged objects, ``prediction/instances``). :class:`MaskRCNNSemantic` also turns its detections into
per-class log-probabilities (the highest mask probability x score of any instance of that class at
each pixel); the MLflow pyfunc (models/pyfunc_model.py) serves that view.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def group_norm(channels: int) -> nn.GroupNorm:
    """32 groups where the channels allow (Wu & He's default), else as many as divide them."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


def _norm_layer(norm: str):
    if norm == "group":
        return group_norm
    if norm == "batch":
        return nn.BatchNorm2d
    raise ValueError(f"unknown Mask R-CNN norm {norm!r}; known: batch, group")


def _keep_scale_transform(min_size: int, max_size: int, mean: list[float], std: list[float]):
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    class KeepScale(GeneralizedRCNNTransform):
        """torchvision's transform without its resize: objects keep their size in pixels."""

        def resize(self, image, target=None):
            return image, target

    return KeepScale(min_size, max_size, mean, std)


def _resnet_fpn(name: str, in_channels: int, norm: str, fpn_channels: int):
    from torchvision.models import resnet
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    layer = _norm_layer(norm)
    net = getattr(resnet, name)(weights=None, norm_layer=layer)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    widths = [net.layer1[-1].conv2.out_channels * 2 ** i for i in range(4)]
    return BackboneWithFPN(net, {f"layer{i + 1}": str(i) for i in range(4)}, widths, fpn_channels,
                           extra_blocks=LastLevelMaxPool(), norm_layer=layer if norm == "group" else None)


def build_maskrcnn(in_channels: int, out_channels: int, *, backbone: str = "mobilenet_v3",
                   min_size: int = 256, max_size: int = 512, trainable_layers: int = 6, norm: str = "batch",
                   fpn_channels: int = 256, anchor_sizes: list[int] | None = None,
                   aspect_ratios: list[float] = (0.5, 1.0, 2.0), keep_scale: bool = False,
                   box_head: int = 1024, mask_head: int = 256, rpn_batch: int = 256, roi_batch: int = 512,
                   roi_positive: float = 0.25, detections: int = 100, proposals_train: int = 2000,
                   proposals_test: int = 1000):
    """``out_channels`` is the number of classes including background. Every default is what a
    card without that argument was built with."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    # Trained from scratch: normalisation must learn (FrozenBatchNorm2d is for pretrained weights).
    layer = _norm_layer(norm)
    anchors = None
    if backbone == "mobilenet_v3":
        body = mobilenet_backbone(backbone_name="mobilenet_v3_large", weights=None, fpn=True,
                                  trainable_layers=trainable_layers, norm_layer=layer)
        sizes = ((16, 32, 64, 128, 256),) * 3
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    elif backbone == "resnet50":
        body = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=5, norm_layer=layer)
    elif backbone in ("resnet18", "resnet34"):
        body = _resnet_fpn(backbone, in_channels, norm, fpn_channels)
    else:
        raise ValueError(f"unknown Mask R-CNN backbone {backbone!r}")
    if anchor_sizes is not None:  # one size per FPN level (5 for the ResNets: strides 4 to 64)
        anchors = AnchorGenerator(tuple((int(s),) for s in anchor_sizes), (tuple(aspect_ratios),) * len(anchor_sizes))
    mean = [0.0] * in_channels
    std = [1.0] * in_channels  # the card's normalisation runs before the model
    if in_channels != 3 and backbone in ("mobilenet_v3", "resnet50"):
        first = body.body["0"][0] if backbone == "mobilenet_v3" else body.body.conv1
        replacement = nn.Conv2d(in_channels, first.out_channels, first.kernel_size, first.stride,
                                first.padding, bias=first.bias is not None)
        if backbone == "mobilenet_v3":
            body.body["0"][0] = replacement
        else:
            body.body.conv1 = replacement
    kwargs = dict(min_size=min_size, max_size=max_size, image_mean=mean, image_std=std,
                  rpn_batch_size_per_image=rpn_batch, box_batch_size_per_image=roi_batch,
                  box_positive_fraction=roi_positive, box_detections_per_img=detections,
                  rpn_pre_nms_top_n_train=proposals_train, rpn_post_nms_top_n_train=proposals_train,
                  rpn_pre_nms_top_n_test=proposals_test, rpn_post_nms_top_n_test=proposals_test)
    if anchors is not None:
        kwargs["rpn_anchor_generator"] = anchors
    channels = body.out_channels  # torchvision's heads, at the widths asked for (its defaults: 1024, 256)
    kwargs.update(box_head=TwoMLPHead(channels * 7 * 7, box_head),
                  box_predictor=FastRCNNPredictor(box_head, out_channels),
                  mask_head=MaskRCNNHeads(channels, [mask_head] * 4, 1,
                                          norm_layer=group_norm if norm == "group" else None),
                  mask_predictor=MaskRCNNPredictor(mask_head, mask_head, out_channels))
    network = MaskRCNN(body, num_classes=None, **kwargs)
    if keep_scale:
        network.transform = _keep_scale_transform(min_size, max_size, mean, std)
    return network


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

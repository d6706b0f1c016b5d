"""DeepLab v3+ (Chen et al., ECCV 2018): atrous ResNet encoder, ASPP, and a decoder that fuses
stride-4 low-level features with the upsampled ASPP output.

The encoder is a torchvision ResNet built with ``weights=None`` (nothing is downloaded); its last
stages use dilation instead of stride (output stride 16 or 8). ASPP is torchvision's.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _atrous(layer: nn.Sequential, dilation: int) -> None:
    """Make a ResNet stage of BasicBlocks keep its input resolution, with dilated 3x3 convolutions."""
    for block in layer:
        for conv in (block.conv1, block.conv2):
            conv.stride = (1, 1)
            conv.dilation = (dilation, dilation)
            conv.padding = (dilation, dilation)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


class DeepLabV3Plus(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, backbone: str = "resnet18", output_stride: int = 16,
                 aspp_channels: int = 128, low_level_channels: int = 48):
        super().__init__()
        from torchvision.models import resnet
        from torchvision.models.segmentation.deeplabv3 import ASPP

        if output_stride not in (8, 16):
            raise ValueError("output_stride must be 8 or 16")
        dilate = [False, False, True] if output_stride == 16 else [False, True, True]
        basic = backbone in ("resnet18", "resnet34")
        net = getattr(resnet, backbone)(weights=None, **({} if basic else {"replace_stride_with_dilation": dilate}))
        if basic:  # torchvision's BasicBlock refuses dilation: turn strides into dilation by hand
            if dilate[1]:
                _atrous(net.layer3, 2)
            _atrous(net.layer4, 4 if dilate[1] else 2)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        low_in = self.layer1[-1].conv1.in_channels if backbone in ("resnet18", "resnet34") else 256
        high_in = 512 if backbone in ("resnet18", "resnet34") else 2048
        rates = [6, 12, 18] if output_stride == 16 else [12, 24, 36]
        self.aspp = ASPP(high_in, rates, aspp_channels)
        self.low_level = nn.Sequential(nn.Conv2d(low_in, low_level_channels, 1, bias=False),
                                       nn.BatchNorm2d(low_level_channels), nn.ReLU(inplace=True))
        self.decoder = nn.Sequential(
            nn.Conv2d(aspp_channels + low_level_channels, aspp_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(aspp_channels), nn.ReLU(inplace=True),
            nn.Conv2d(aspp_channels, aspp_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(aspp_channels), nn.ReLU(inplace=True),
            nn.Conv2d(aspp_channels, num_classes, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        low = self.layer1(self.stem(x))
        high = self.aspp(self.layer4(self.layer3(self.layer2(low))))
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)
        out = self.decoder(torch.cat([high, self.low_level(low)], dim=1))
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False)


def build_deeplab(in_channels: int, out_channels: int, *, backbone: str = "resnet18", output_stride: int = 16,
                  aspp_channels: int = 128) -> DeepLabV3Plus:
    return DeepLabV3Plus(in_channels, out_channels, backbone=backbone, output_stride=output_stride,
                         aspp_channels=aspp_channels)

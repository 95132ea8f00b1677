"""Backbones from torchvision, with a 1- or 3-channel input and no classifier.

One-channel input: conv1's weights are summed over the RGB axis (the stem a gray image would see
if it were repeated to three channels, at a third of the cost of repeating it). With ImageNet
weights this is exact for gray images; with random init it is just a 1-channel conv.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from runner.ml.config import ARCHS

FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}


class Backbone(nn.Module):
    """A ResNet without its fc layer: images (B, C, H, W) -> features (B, D)."""

    def __init__(self, arch: str = "resnet50", in_channels: int = 3, weights: str | None = None) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown backbone {arch!r}; one of {', '.join(ARCHS)}")
        net = getattr(torchvision.models, arch)(weights=weights)
        if in_channels == 1:
            old = net.conv1
            conv = nn.Conv2d(1, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
            with torch.no_grad():
                conv.weight.copy_(old.weight.sum(dim=1, keepdim=True))
            net.conv1 = conv
        elif in_channels != 3:
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        net.fc = nn.Identity()
        self.net = net
        self.arch = arch
        self.in_channels = in_channels
        self.dim = FEATURE_DIMS[arch]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Classifier(nn.Module):
    """Backbone + linear head: what fine-tuning and supervised training train."""

    def __init__(self, backbone: Backbone, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

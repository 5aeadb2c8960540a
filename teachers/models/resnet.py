"""CIFAR-style residual networks.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016:

* ``resnet8``, ``resnet20``: the CIFAR family of Sec. 4.2 (3x3 stem with 16 channels, three
  stages of ``(depth - 2) / 6`` BasicBlocks with 16/32/64 channels, global average pooling).
  Shortcuts that change shape are 1x1 conv + BN (option B), as in the distillation
  literature's ``resnet_tiny`` / CRD code.
* ``resnet18``, ``resnet34``: the ImageNet stage layout (64..512 channels, [2,2,2,2] and
  [3,4,6,3] BasicBlocks) with a 3x3 stride-1 stem and no max pooling, as used for CIFAR by
  DeepInversion (Yin et al., CVPR 2020) and DFAD (Fang et al., 2019).

All accept 1- or 3-channel inputs of 28..32 px (any size, thanks to global average pooling).
Activations are functional and not in place, so forward hooks and input gradients are safe.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from teachers.registry import register_model

__all__ = ["BasicBlock", "ResNet"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut; ReLU after the sum."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem (3x3 conv-BN-ReLU, stride 1) -> stages ``layer1..layerK`` -> GAP -> ``fc``.

    Args:
        widths: channels of each stage; the first stage has stride 1, the others stride 2.
        depths: BasicBlocks per stage.
    """

    head_path = "fc"

    def __init__(
        self,
        widths: Sequence[int],
        depths: Sequence[int],
        num_classes: int = 10,
        in_channels: int = 3,
    ):
        super().__init__()
        if len(widths) != len(depths):
            raise ValueError("widths and depths must have the same length")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        names = []
        for i, (w, d) in enumerate(zip(widths, depths), start=1):
            blocks = []
            for j in range(d):
                stride = 2 if (i > 1 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, w, stride))
                in_planes = w
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            names.append(f"layer{i}")
        self.block_paths = tuple(names)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        for name in self.block_paths:
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def _cifar_depths(depth: int) -> list[int]:
    if (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    return [(depth - 2) // 6] * 3


@register_model("resnet8")
def resnet8(num_classes=10, in_channels=3, image_size=32, **kw):
    """CIFAR ResNet-8 (He et al. 2016): 1 BasicBlock per stage, 16/32/64 channels."""
    return ResNet((16, 32, 64), _cifar_depths(8), num_classes, in_channels, **kw)


@register_model("resnet20")
def resnet20(num_classes=10, in_channels=3, image_size=32, **kw):
    """CIFAR ResNet-20 (He et al. 2016): 3 BasicBlocks per stage, 16/32/64 channels."""
    return ResNet((16, 32, 64), _cifar_depths(20), num_classes, in_channels, **kw)


@register_model("resnet18")
def resnet18(num_classes=10, in_channels=3, image_size=32, **kw):
    """ResNet-18 for small images: 3x3 stride-1 stem, no max pooling, stages 64..512."""
    return ResNet((64, 128, 256, 512), (2, 2, 2, 2), num_classes, in_channels, **kw)


@register_model("resnet34")
def resnet34(num_classes=10, in_channels=3, image_size=32, **kw):
    """ResNet-34 for small images: 3x3 stride-1 stem, no max pooling, stages 64..512."""
    return ResNet((64, 128, 256, 512), (3, 4, 6, 3), num_classes, in_channels, **kw)

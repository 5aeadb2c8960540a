"""LeNet-5 as used by DAFL and ZSKD.

LeCun et al., "Gradient-based learning applied to document recognition", Proc. IEEE 1998;
the exact variant (ReLU, max pooling, no BatchNorm) is the teacher of
Chen et al., "Data-Free Learning of Student Networks" (DAFL), ICCV 2019, and of
Nayak et al., "Zero-Shot Knowledge Distillation in Deep Networks" (ZSKD), ICML 2019.
DAFL's student ``LeNet5Half`` halves every width (3, 8, 60, 42).

Module names follow DAFL's ``lenet.py`` (``conv1``, ``relu1``, ``maxpool1``, ..., ``fc1``,
``relu4``, ``fc2``) so that its plain state dicts import unchanged (for the variants
without BatchNorm).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from teachers.registry import register_model

__all__ = ["LeNet5"]


class LeNet5(nn.Module):
    """LeNet-5: three 5x5 conv blocks (the third yields 120 channels at 1x1) and two linears.

    ``conv1`` is zero-padded by ``ceil((32 - image_size) / 2)`` so that images of 28..32 px
    reach ``conv3`` at 5x5 exactly as 32 px images do; larger inputs are averaged to 1x1 by
    adaptive pooling before flattening (an identity for 32 px).

    Args:
        num_classes: output classes.
        in_channels: 1 (grey) or 3 (colour).
        image_size: input height = width.
        widths: channels of conv1, conv2, conv3 and fc1; ``(6, 16, 120, 84)`` by default.
        batchnorm: add ``BatchNorm2d`` after each conv and ``BatchNorm1d`` after fc1 (before
            its ReLU).
    """

    head_path = "fc2"
    block_paths = ("maxpool1", "maxpool2", "relu3")

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 32,
        widths: tuple[int, int, int, int] = (6, 16, 120, 84),
        batchnorm: bool = False,
    ):
        super().__init__()
        c1, c2, c3, f1 = widths
        pad = max(0, (33 - image_size) // 2)

        def bn2d(c):
            return nn.BatchNorm2d(c) if batchnorm else nn.Identity()

        self.conv1 = nn.Conv2d(in_channels, c1, kernel_size=5, padding=pad)
        self.bn1 = bn2d(c1)
        self.relu1 = nn.ReLU()
        self.maxpool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=5)
        self.bn2 = bn2d(c2)
        self.relu2 = nn.ReLU()
        self.maxpool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.conv3 = nn.Conv2d(c2, c3, kernel_size=5)
        self.bn3 = bn2d(c3)
        self.relu3 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(c3, f1)
        self.bn4 = nn.BatchNorm1d(f1) if batchnorm else nn.Identity()
        self.relu4 = nn.ReLU()
        self.fc2 = nn.Linear(f1, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.maxpool2(self.relu2(self.bn2(self.conv2(x))))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = torch.flatten(self.pool(x), 1)
        x = self.relu4(self.bn4(self.fc1(x)))
        return self.fc2(x)


FULL = (6, 16, 120, 84)
HALF = (3, 8, 60, 42)


@register_model("lenet5")
def lenet5(num_classes=10, in_channels=1, image_size=32, **kw):
    """DAFL/ZSKD teacher LeNet-5, no BatchNorm."""
    return LeNet5(num_classes, in_channels, image_size, widths=FULL, batchnorm=False, **kw)


@register_model("lenet5_bn")
def lenet5_bn(num_classes=10, in_channels=1, image_size=32, **kw):
    """LeNet-5 with BatchNorm (gives DeepInversion BN statistics to match)."""
    return LeNet5(num_classes, in_channels, image_size, widths=FULL, batchnorm=True, **kw)


@register_model("lenet5_half")
def lenet5_half(num_classes=10, in_channels=1, image_size=32, **kw):
    """DAFL's student LeNet-5-Half: every layer at half width (3, 8, 60, 42)."""
    return LeNet5(num_classes, in_channels, image_size, widths=HALF, batchnorm=False, **kw)


@register_model("lenet5_half_bn")
def lenet5_half_bn(num_classes=10, in_channels=1, image_size=32, **kw):
    """LeNet-5-Half with BatchNorm."""
    return LeNet5(num_classes, in_channels, image_size, widths=HALF, batchnorm=True, **kw)

"""Wide residual networks (pre-activation).

Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016; the variant and module names of
Micaelli & Storkey, "Zero-shot Knowledge Transfer via Adversarial Belief Matching" (ZSKT),
NeurIPS 2019, also used by DFAD (Fang et al., 2019): ``conv1``, ``block1..3`` (each a
``NetworkBlock`` holding ``layer``), ``bn1``, ``fc``. ``WRN-d-k`` has ``(d - 4) / 6``
blocks per stage and widths 16, 16k, 32k, 64k. The outputs of ``block1..3`` (before the
final BN-ReLU) are the attention-transfer taps, as in ZSKT.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from teachers.registry import register_model

__all__ = ["WideBasicBlock", "NetworkBlock", "WideResNet"]


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 + shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.convShortcut = (
            None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(pre)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.equal_in_out else self.convShortcut(pre)
        return shortcut + out


class NetworkBlock(nn.Module):
    """A stage of ``n`` WideBasicBlocks; the first may change width and stride."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(n)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen_factor: conv1 -> block1..3 -> BN-ReLU -> GAP -> fc."""

    head_path = "fc"
    block_paths = ("block1", "block2", "block3")

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int = 10,
        in_channels: int = 3,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, ch[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.block3(self.block2(self.block1(x)))
        x = F.relu(self.bn1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model("wrn16_1")
def wrn16_1(num_classes=10, in_channels=3, image_size=32, **kw):
    """WRN-16-1 (Zagoruyko & Komodakis 2016), ZSKT's smallest student."""
    return WideResNet(16, 1, num_classes, in_channels, **kw)


@register_model("wrn16_2")
def wrn16_2(num_classes=10, in_channels=3, image_size=32, **kw):
    """WRN-16-2 (Zagoruyko & Komodakis 2016), a ZSKT/DFAD student."""
    return WideResNet(16, 2, num_classes, in_channels, **kw)


@register_model("wrn40_2")
def wrn40_2(num_classes=10, in_channels=3, image_size=32, **kw):
    """WRN-40-2 (Zagoruyko & Komodakis 2016), the ZSKT/DFAD CIFAR teacher."""
    return WideResNet(40, 2, num_classes, in_channels, **kw)

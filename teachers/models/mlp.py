"""A plain ReLU multi-layer perceptron on flattened images (a weak baseline / tiny student)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn

from teachers.registry import register_model

__all__ = ["MLP"]


class MLP(nn.Module):
    """flatten -> [Linear -> ReLU] * len(hidden) -> Linear(num_classes). No BatchNorm.

    The input must be exactly ``in_channels x image_size x image_size``. ``block_paths`` are
    the hidden ReLUs (``hidden.relu1``, ...); their outputs are ``(N, width)`` vectors, not
    feature maps. ``head_path`` is ``"classifier"``.
    """

    head_path = "classifier"

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 32,
        hidden: Sequence[int] = (256, 128),
    ):
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        width = in_channels * image_size * image_size
        for i, h in enumerate(hidden, start=1):
            layers[f"fc{i}"] = nn.Linear(width, int(h))
            layers[f"relu{i}"] = nn.ReLU()
            width = int(h)
        self.hidden = nn.Sequential(layers)
        self.classifier = nn.Linear(width, num_classes)
        self.block_paths = tuple(f"hidden.relu{i}" for i in range(1, len(hidden) + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.hidden(torch.flatten(x, 1)))


@register_model("mlp")
def mlp(num_classes=10, in_channels=1, image_size=32, hidden=(256, 128), **kw):
    """ReLU MLP with hidden widths ``hidden`` (default ``(256, 128)``)."""
    return MLP(num_classes, in_channels, image_size, hidden=hidden, **kw)

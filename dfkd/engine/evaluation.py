"""Evaluation on real test data, for reporting only: batched predictions and agreement rates."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from teachers.device import batched_logits


@dataclass
class EvalData:
    """Real test images (``[0,1]``) and labels, used for reporting only."""

    images: torch.Tensor
    labels: torch.Tensor
    name: str = "test"


def predict(model: nn.Module, images: torch.Tensor, device, batch_size: int = 1000) -> torch.Tensor:
    """Arg-max predictions of ``model`` on ``images`` (CPU), through :func:`teachers.device.batched_logits`."""
    logits = batched_logits(model, images, device, batch_size)
    return logits.argmax(1) if logits.numel() else torch.empty(0, dtype=torch.long)


def match_rate(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of positions where two label vectors agree (accuracy, or teacher agreement)."""
    return float((predictions == targets).float().mean())


def per_class_accuracy(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list:
    result = []
    for k in range(num_classes):
        mask = labels == k
        result.append(float((predictions[mask] == k).float().mean()) if mask.any() else None)
    return result

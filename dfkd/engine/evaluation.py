"""Evaluation on real test data, for reporting only: batched predictions and agreement rates."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dfkd.core.device import autocast


@dataclass
class EvalData:
    """Real test images (``[0,1]``) and labels, used for reporting only."""

    images: torch.Tensor
    labels: torch.Tensor
    name: str = "test"


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, device, batch_size: int = 1000) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device, non_blocking=True)
        with autocast(device):
            out.append(model(x).float().argmax(1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def match_rate(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of positions where two label vectors agree (accuracy, or teacher agreement)."""
    return float((predictions == targets).float().mean())


def per_class_accuracy(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list:
    result = []
    for k in range(num_classes):
        mask = labels == k
        result.append(float((predictions[mask] == k).float().mean()) if mask.any() else None)
    return result

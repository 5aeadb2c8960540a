"""Evaluation on real test data, for reporting only: batched predictions and agreement rates.

The test images are either one ``N x C x H x W`` tensor in ``[0, 1]`` or a map-style data set
of images or ``(image, label)`` pairs (:func:`dfkd.data.open_dataset`'s split keeps uint8
pixels and converts a batch at a time), which :func:`predict` reads through a
:class:`torch.utils.data.DataLoader`: memory then holds the stored pixels and one batch of
floats, however large the test split. Both give the same predictions on the same images.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dfkd.data.types import image_of
from teachers.device import batched_logits


class ImageView(torch.utils.data.Dataset):
    """Positions ``indices`` (a ``range``) of a map-style data set, sliceable like a tensor:
    ``view[a:b]`` is the view of those items (how a rank takes its share of the test set)."""

    def __init__(self, dataset, indices: range | None = None):
        self.dataset = dataset
        self.indices = range(len(dataset)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return ImageView(self.dataset, self.indices[index])
        return self.dataset[self.indices[index]]

    def __getitems__(self, indices: list[int]) -> list:
        positions = [self.indices[i] for i in indices]
        if hasattr(self.dataset, "__getitems__"):
            return self.dataset.__getitems__(positions)
        return [self.dataset[i] for i in positions]


@dataclass
class EvalData:
    """Real test images (``[0,1]``) and labels, used for reporting only.

    ``images``: an ``N x C x H x W`` tensor, or a map-style data set of ``N`` images or
    ``(image, label)`` pairs (held as an :class:`ImageView`); see the module docstring.
    """

    images: torch.Tensor | torch.utils.data.Dataset
    labels: torch.Tensor
    name: str = "test"

    def __post_init__(self) -> None:
        if not isinstance(self.images, (torch.Tensor, ImageView)):
            self.images = ImageView(self.images)
        if len(self.images) != len(self.labels):
            raise ValueError(f"evaluation data: {len(self.images)} images but {len(self.labels)} labels; "
                             "give one label per image")

    @classmethod
    def from_dataset(cls, dataset, name: str | None = None) -> "EvalData":
        """The split ``dataset`` (e.g. :func:`dfkd.data.open_dataset`'s), read a batch at a time,
        with its ``labels``."""
        return cls(dataset, dataset.labels, name or getattr(getattr(dataset, "info", None), "name", "test"))

    def head(self, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``limit`` images (as one float tensor) and their labels: what the plots and
        sample-quality metrics of a run read, bounded whatever the size of the test split."""
        n = min(int(limit), len(self.labels))
        if isinstance(self.images, torch.Tensor):
            return self.images[:n], self.labels[:n]
        loader = torch.utils.data.DataLoader(self.images[:n], batch_size=1000, shuffle=False, num_workers=0)
        parts = [image_of(batch) for batch in loader]
        return (torch.cat(parts) if parts else torch.zeros(0)), self.labels[:n]




def model_logits(model: nn.Module, images, device, batch_size: int = 1000) -> torch.Tensor:
    """``model``'s logits on ``images`` (on the CPU): a CPU tensor, or a map-style data set read
    through a DataLoader ``batch_size`` images at a time (:func:`teachers.device.batched_logits`)."""
    if isinstance(images, torch.Tensor):
        return batched_logits(model, images, device, batch_size)
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=0)
    parts = [batched_logits(model, image_of(batch), device, batch_size) for batch in loader]
    return torch.cat(parts) if parts else torch.zeros(0, 0)


def predict(model: nn.Module, images, device, batch_size: int = 1000) -> torch.Tensor:
    """Arg-max predictions of ``model`` on ``images`` (as :func:`model_logits` reads them)."""
    logits = model_logits(model, images, device, batch_size)
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

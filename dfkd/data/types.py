"""What a data set comes back as: :class:`ArrayDataset` (tensors) and :class:`DatasetInfo`."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch


class DatasetError(ValueError):
    """A user-facing data problem. The message says what is wrong and how to fix it."""


# ---------------------------------------------------------------------------------------------
# Containers
# ---------------------------------------------------------------------------------------------


@dataclass
class DatasetInfo:
    """Description of a loaded (or loadable) data set.

    ``classes`` holds the ORIGINAL class ids in label order: label ``i`` of the data set is the
    original class ``classes[i]`` named ``class_names[i]``. For a class subset
    ``num_classes == len(classes) < full number of classes``, while ``mean``/``std`` stay those
    of the full training split (they are constants per data set, independent of the subset and
    of ``image_size``).
    """

    name: str
    num_classes: int
    class_names: list[str]
    classes: list[int]
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    split: str
    split_seed: int | None = None

    def to_meta(self) -> dict:
        """Plain-Python dict (lists instead of tuples, only str/int/float/None), suitable for
        checkpoint metadata that loads with ``torch.load(..., weights_only=True)``."""
        return {
            "name": str(self.name),
            "num_classes": int(self.num_classes),
            "class_names": [str(c) for c in self.class_names],
            "classes": [int(c) for c in self.classes],
            "image_shape": [int(s) for s in self.image_shape],
            "mean": [float(m) for m in self.mean],
            "std": [float(s) for s in self.std],
            "source": str(self.source),
            "split": str(self.split),
            "split_seed": None if self.split_seed is None else int(self.split_seed),
        }


@dataclass
class ArrayDataset:
    """A whole data split held as two CPU tensors.

    ``images``: float32, ``N x C x H x W``, values in ``[0, 1]``, contiguous.
    ``labels``: int64, ``N``, values ``0 .. info.num_classes - 1`` (indices into ``info.classes``).
    """

    images: torch.Tensor
    labels: torch.Tensor
    info: DatasetInfo

    def __post_init__(self) -> None:
        if self.images.dim() != 4:
            raise DatasetError(f"images must be N x C x H x W, got shape {tuple(self.images.shape)}")
        if self.labels.dim() != 1 or self.labels.shape[0] != self.images.shape[0]:
            raise DatasetError(
                f"labels must be a vector with one entry per image: images {tuple(self.images.shape)}, "
                f"labels {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image, label)`` of one example (so the data set also works with a DataLoader)."""
        return self.images[index], self.labels[index]

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        device: str | torch.device = "cpu",
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)`` batches moved to ``device``, by slicing the tensors (no DataLoader).

        ``shuffle`` draws one permutation per call from ``generator`` (a CPU
        ``torch.Generator``; the global RNG when ``None``), so the same seeded generator gives
        the same batch order. ``drop_last`` skips a final incomplete batch.

        Without shuffling on the CPU the batches are *views* of the data set: do not modify
        them in place.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise DatasetError(f"batch_size must be a positive integer, got {batch_size!r}")
        batch_size = int(batch_size)
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else None
        device = torch.device(device)
        for start in range(0, n, batch_size):
            end = min(start + batch_size, n)
            if drop_last and end - start < batch_size:
                break
            if order is None:
                x, y = self.images[start:end], self.labels[start:end]
            else:
                idx = order[start:end]
                x, y = self.images.index_select(0, idx), self.labels.index_select(0, idx)
            if device.type != "cpu":
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            yield x, y


@dataclass
class RawSplit:
    """What a :class:`DatasetSpec` reader returns before subsetting/resizing.

    ``images``: ``N x C x H x W`` numpy array or CPU tensor, either uint8 (0..255) or floating
    in ``[0, 1]``.
    ``labels``: int64 numpy vector with values ``0 .. num_classes - 1`` of the full data set.
    ``source``: where the data came from (a path, or ``"sklearn"``).
    """

    images: np.ndarray | torch.Tensor
    labels: np.ndarray
    source: str
    split_seed: int | None = None


def image_of(item):
    """The images of a data set's item or batch: the item itself, or the first of an
    ``(images, labels)`` pair (what a split of :func:`dfkd.data.open_dataset` yields)."""
    return item[0] if isinstance(item, (tuple, list)) else item

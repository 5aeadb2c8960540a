"""A data split kept as its stored pixels and converted a batch at a time: :class:`LabeledImages`.

The pixels stay as the files hold them (uint8, or the few floats of scikit-learn's digits) at
their native size; each item, or each batch a :class:`torch.utils.data.DataLoader` asks for,
is converted to float32 in ``[0, 1]`` and resized to the requested square side when read. A
test split evaluated through :meth:`LabeledImages.loader` therefore never exists as one float
tensor, and the numbers are the ones of the whole-split conversion (the same arithmetic, image
by image).
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from dfkd.data.types import ArrayDataset, DatasetError, DatasetInfo

#: Number of images converted at once when a whole split is converted (bounds the temporary memory).
CONVERT_CHUNK = 4096


def to_float_images(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """``N x C x H x W`` uint8 (0..255) or floating (``[0, 1]``) pixels as float32 in ``[0, 1]``,
    resized to ``size`` x ``size`` with antialiased bilinear interpolation."""
    images = pixels.contiguous().to(torch.float32)
    if pixels.dtype == torch.uint8:
        images.div_(255.0)
    if tuple(images.shape[2:]) != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return images.clamp_(0.0, 1.0)


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise DatasetError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


class LabeledImages(torch.utils.data.Dataset):
    """One split of a data set: ``(image, label)`` items, ``image`` a ``C x size x size`` float32
    in ``[0, 1]`` converted from the stored ``pixels`` when it is read.

    ``pixels``: ``N x C x H x W`` uint8 (or floating in ``[0, 1]``) on the CPU, at the native size.
    ``labels``: int64, ``N``, values ``0 .. info.num_classes - 1``. ``info.image_shape`` gives
    the size items come out at.
    """

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, info: DatasetInfo):
        if pixels.dim() != 4 or labels.dim() != 1 or labels.shape[0] != pixels.shape[0]:
            raise DatasetError(f"pixels must be N x C x H x W with one label each, got {tuple(pixels.shape)} "
                               f"and {tuple(labels.shape)}")
        self.pixels, self.labels, self.info = pixels, labels, info
        self.size = int(info.image_shape[1])

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return to_float_images(self.pixels[index][None], self.size)[0], self.labels[index]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A DataLoader's batch, converted in one call."""
        index = torch.as_tensor(indices, dtype=torch.long)
        images = to_float_images(self.pixels.index_select(0, index), self.size)
        labels = self.labels.index_select(0, index)
        return list(zip(images.unbind(0), labels.unbind(0)))

    def loader(self, batch_size: int = 1000, shuffle: bool = False, generator: torch.Generator | None = None,
               drop_last: bool = False, num_workers: int = 0) -> torch.utils.data.DataLoader:
        """A :class:`torch.utils.data.DataLoader` of ``(images, labels)`` batches (in order unless
        ``shuffle``; a seeded CPU ``generator`` gives the same order again)."""
        return torch.utils.data.DataLoader(self, batch_size=_check_batch_size(batch_size), shuffle=shuffle,
                                           generator=generator, drop_last=drop_last, num_workers=num_workers)

    def to_arrays(self) -> ArrayDataset:
        """The whole split as one float tensor (:class:`ArrayDataset`), converted chunk by chunk."""
        n, c = self.pixels.shape[:2]
        images = torch.empty((n, c, self.size, self.size), dtype=torch.float32)
        for start in range(0, n, CONVERT_CHUNK):
            images[start : start + CONVERT_CHUNK] = to_float_images(self.pixels[start : start + CONVERT_CHUNK], self.size)
        return ArrayDataset(images=images, labels=self.labels, info=self.info)

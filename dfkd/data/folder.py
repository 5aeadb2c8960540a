"""Unlabeled images on disk, read a batch at a time: transfer sets.

A transfer-set folder holds image files (PNG, JPEG, BMP, WebP, at any depth) and/or array
shards (``*.npy``, ``N x C x H x W`` uint8, as :func:`write_shard` writes them; each image's
bytes are read from the file when asked for, so a shard is never loaded or mapped whole). :class:`ImageFolderSet` indexes the folder
once and returns one ``C x H x W`` float image in ``[0, 1]`` per item, converted to the
teacher's channels and resized to its image size, so memory stays flat however large the
folder is. Whatever made the images does not matter: ``dfkd synthesize``'s shards, another
tool's PNG export, or unlabeled photos from another domain.

Image files are read by torchvision's image-folder loader (``torchvision.datasets.folder.pil_loader``,
what ``ImageFolder`` reads with: RGB through Pillow; a grey teacher gets its luma). ``ImageFolder``
itself does not fit: it wants one sub-folder per class and knows no shards. A folder is indexed
from the image headers, without decoding the pixels.

Checked when the folder is indexed, each with a one-line :class:`TransferSetError` naming the
file: a folder with no images, a file that cannot be read as an image, images of different
sizes, shards that are not ``N x C x H x W`` uint8.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dfkd.data.types import DatasetError
from teachers.files import atomic_write, write_json

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SHARD_SUFFIX = ".npy"
MANIFEST = "manifest.json"


class TransferSetError(DatasetError):
    """A transfer-set folder that cannot be used as it is."""


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.verify()  # header and structure, without decoding the pixels
            return image.size[1], image.size[0]
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise TransferSetError(f"{path}: not a readable image; remove it from the transfer set or replace it") from None


def _shard_header(path: Path) -> tuple[tuple[int, ...], int]:
    """A shard's shape and the byte offset of its first pixel (its header read, nothing else)."""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(handle)
            offset = handle.tell()
    except (OSError, ValueError):
        raise TransferSetError(f"{path}: not a readable .npy array; remove it from the transfer set or replace it") from None
    if dtype != np.uint8 or len(shape) != 4 or fortran:
        raise TransferSetError(f"{path}: a shard must be an N x C x H x W uint8 array, got {dtype} {tuple(shape)}")
    if path.stat().st_size < offset + int(np.prod(shape)):
        raise TransferSetError(f"{path}: truncated ({path.stat().st_size} bytes for {tuple(shape)} pixels); "
                               "write it again or remove it")
    return tuple(shape), offset


class ImageFolderSet(torch.utils.data.Dataset):
    """The unlabeled images of ``root`` as ``C x H x W`` floats in ``[0, 1]`` of ``image_shape``
    (see the module docstring)."""

    def __init__(self, root, image_shape: Sequence[int]):
        self.root = Path(root)
        self.image_shape = tuple(int(v) for v in image_shape)
        if not self.root.is_dir():
            raise TransferSetError(f"transfer set {self.root}: no such folder; give a folder of images or shards")
        files = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        shards = sorted(p for p in self.root.rglob(f"*{SHARD_SUFFIX}") if p.is_file())
        if not files and not shards:
            raise TransferSetError(f"transfer set {self.root}: no images (PNG, JPEG, BMP, WebP) or .npy shards in it")
        self.items: list[tuple[Path, int]] = []  # (file, row in a shard; -1 for an image file)
        first_size, first_file = None, None
        for path in files:
            size = _image_size(path)
            first_size, first_file = self._same_size(size, path, first_size, first_file)
            self.items.append((path, -1))
        self._shards: dict[Path, tuple[tuple[int, ...], int]] = {}  # shape and pixel offset of each shard
        for path in shards:
            shape, offset = _shard_header(path)
            first_size, first_file = self._same_size(shape[2:], path, first_size, first_file)
            self._shards[path] = (shape, offset)
            self.items.extend((path, row) for row in range(shape[0]))
        self.source_size = first_size

    @staticmethod
    def _same_size(size, path, first_size, first_file):
        if first_size is None:
            return tuple(size), path
        if tuple(size) != first_size:
            raise TransferSetError(f"{path}: {size[0]}x{size[1]} pixels, but {first_file} is "
                                   f"{first_size[0]}x{first_size[1]}; a transfer set holds images of one size")
        return first_size, first_file

    def __len__(self) -> int:
        return len(self.items)

    def _pixels(self, path: Path, row: int) -> torch.Tensor:
        if row >= 0:  # one image's bytes read from the file: nothing of the shard stays mapped
            shape, offset = self._shards[path]
            size = int(np.prod(shape[1:]))
            with open(path, "rb") as handle:
                handle.seek(offset + row * size)
                data = handle.read(size)
            return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(*shape[1:])
        from PIL import UnidentifiedImageError
        from torchvision.datasets.folder import pil_loader

        try:
            image = pil_loader(str(path))  # RGB
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            raise TransferSetError(f"{path}: not a readable image; remove it from the transfer set or replace it") from None
        array = np.asarray(image.convert("L") if self.image_shape[0] == 1 else image, dtype=np.uint8)
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        return torch.from_numpy(array.copy())

    def __getitem__(self, index: int) -> torch.Tensor:
        path, row = self.items[index]
        pixels = self._pixels(path, row)
        channels, height, width = self.image_shape
        if pixels.shape[0] != channels:  # a grey shard for a colour teacher, or the other way round
            pixels = pixels.expand(channels, -1, -1) if pixels.shape[0] == 1 else pixels.float().mean(0, keepdim=True)
        image = pixels.float().div_(255.0)
        if tuple(image.shape[1:]) != (height, width):
            image = F.interpolate(image[None], size=(height, width), mode="bilinear", antialias=True,
                                  align_corners=False)[0].clamp_(0, 1)
        return image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``N x C x H x W`` images in ``[0, 1]`` as uint8 pixels (rounded)."""
    return images.detach().clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()


def write_shard(path, images: torch.Tensor) -> Path:
    """Write a batch of ``[0, 1]`` images as an ``N x C x H x W`` uint8 ``.npy`` shard, atomically."""
    array = to_uint8(images)
    return atomic_write(Path(path), lambda handle: np.save(handle, array, allow_pickle=False))


def write_manifest(root, manifest: dict) -> Path:
    """The transfer set's ``manifest.json`` (what made it, counts per class, image statistics)."""
    return write_json(Path(root) / MANIFEST, manifest)


def read_manifest(root) -> dict | None:
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise TransferSetError(f"{path}: not a readable JSON manifest; remove or replace it") from None

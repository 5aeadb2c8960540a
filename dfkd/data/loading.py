"""Loading a registered data set: find (or download) its files, subset, resize, convert."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dfkd.data.registry import get_spec, make_info, resolve_classes, resolve_size
from dfkd.data.types import ArrayDataset, DatasetError

#: Number of images converted/resized at once (bounds the temporary memory).
_RESIZE_CHUNK = 4096

SPLITS = ("train", "test")

# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def default_data_root() -> Path:
    """Directory searched when no ``root`` is given and used for downloads:
    ``$DFKD_DATA_ROOT``, else ``~/.cache/dfkd/data``."""
    env = os.environ.get("DFKD_DATA_ROOT")
    return Path(env).expanduser() if env else Path("~/.cache/dfkd/data").expanduser()


def _to_float_images(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (or float in [0,1]) N x C x H x W numpy -> float32 torch in [0,1], resized to
    ``size`` x ``size`` with antialiased bilinear interpolation, chunk by chunk."""
    n, c, h, w = images.shape
    is_uint8 = images.dtype == np.uint8
    out = torch.empty((n, c, size, size), dtype=torch.float32)
    for start in range(0, n, _RESIZE_CHUNK):
        part = images[start : start + _RESIZE_CHUNK]
        if not (part.flags.writeable and part.flags.c_contiguous and part.dtype.isnative):
            part = np.array(part, dtype=part.dtype.newbyteorder("="), order="C")  # torch needs writable memory
        chunk = torch.from_numpy(part).to(torch.float32)
        if is_uint8:
            chunk.div_(255.0)
        if (h, w) != (size, size):
            chunk = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + chunk.shape[0]] = chunk.clamp_(0.0, 1.0)
    return out


def load_dataset(
    name: str,
    split: str = "train",
    root: str | os.PathLike | None = None,
    download: bool = False,
    classes: Any = None,
    image_size: int | None = None,
) -> ArrayDataset:
    """Load one split of a registered data set into memory.

    Args:
        name: registered name (see :func:`list_datasets`).
        split: ``"train"`` or ``"test"``.
        root: directory holding the data set files (layouts per data set in the module
            docstring). ``None`` searches ``$DFKD_DATA_ROOT`` / ``~/.cache/dfkd/data`` (and, for
            Fashion-MNIST, Debian's ``/usr/share/datasets/fashion-mnist``).
        download: fetch the files with torchvision into ``root`` (or the default root) when
            they are not found.
        classes: class subset (see :func:`parse_classes`); labels are remapped to
            ``0..k-1`` in the given order and ``info.classes`` keeps the original ids.
        image_size: final square side (default per data set, 32 for all built-in ones).

    Raises:
        DatasetError: unknown name/split, bad classes or size, missing or corrupt files.
    """
    spec = get_spec(name)
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    ids = resolve_classes(spec, classes)
    size = resolve_size(spec, image_size)
    root_path = Path(root).expanduser() if root is not None else None
    raw = spec.load_raw(split, root_path, bool(download))

    images, labels = raw.images, np.asarray(raw.labels, dtype=np.int64).reshape(-1)
    if images.ndim != 4 or images.shape[0] != labels.shape[0] or images.shape[1] != spec.channels:
        raise DatasetError(
            f"{spec.name} ({raw.source}): expected images N x {spec.channels} x H x W with one label each, "
            f"got images {images.shape} and {labels.shape[0]} labels; the files may be corrupt"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise DatasetError(
            f"{spec.name} ({raw.source}): labels outside 0..{spec.num_classes - 1} "
            f"(found {int(labels.min())}..{int(labels.max())}); the files may be corrupt"
        )
    if ids != list(range(spec.num_classes)):
        keep = np.isin(labels, ids)
        lut = np.full(spec.num_classes, -1, dtype=np.int64)
        lut[ids] = np.arange(len(ids))
        images, labels = images[keep], lut[labels[keep]]

    x = _to_float_images(images, size)
    y = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    info = make_info(spec, ids, size, split, raw.source, spec.class_names_from(raw), raw.split_seed)
    return ArrayDataset(images=x, labels=y, info=info)


def search_roots(root: Path | None) -> list[Path]:
    return [root] if root is not None else [default_data_root()]


def download_root(root: Path | None) -> Path:
    path = root if root is not None else default_data_root()
    path.mkdir(parents=True, exist_ok=True)
    return path


def download_failed(name: str, root: Path, err: Exception) -> DatasetError:
    return DatasetError(
        f"downloading {name} into {root} failed ({type(err).__name__}: {err}); check the network, "
        f"or put the files there yourself and pass --data-root {root}"
    )


def not_found(name: str, searched: list[Path], layout: str, extra: str = "") -> DatasetError:
    where = ", ".join(str(p) for p in searched) or "(nothing)"
    return DatasetError(
        f"{name} not found (searched: {where}). {extra}"
        f"Pass --data-root DIR (root=DIR) where DIR holds {layout}, "
        f"or --download (download=True) to fetch it with torchvision."
    )



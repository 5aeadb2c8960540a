"""Loading a registered data set: find (or download) its files, subset, resize, convert."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dfkd.data.registry import get_spec, make_info, resolve_classes, resolve_size
from dfkd.data.stream import LabeledImages
from dfkd.data.types import ArrayDataset, DatasetError

SPLITS = ("train", "test")

# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def default_data_root() -> Path:
    """Directory searched when no ``root`` is given and used for downloads:
    ``$DFKD_DATA_ROOT``, else ``~/.cache/dfkd/data``."""
    env = os.environ.get("DFKD_DATA_ROOT")
    return Path(env).expanduser() if env else Path("~/.cache/dfkd/data").expanduser()


def _as_tensor(images) -> torch.Tensor:
    """A reader's ``N x C x H x W`` pixels (numpy or torch) as a CPU tensor, without copying
    what torch can use as it is."""
    if isinstance(images, torch.Tensor):
        return images
    if not (images.flags.writeable and images.dtype.isnative):
        images = np.array(images, dtype=images.dtype.newbyteorder("="))  # torch needs writable native memory
    return torch.from_numpy(images)


def open_dataset(
    name: str,
    split: str = "train",
    root: str | os.PathLike | None = None,
    download: bool = False,
    classes: Any = None,
    image_size: int | None = None,
) -> LabeledImages:
    """Open one split of a registered data set: its stored pixels (uint8 at the native size),
    converted to float and resized an item or a batch at a time (:class:`LabeledImages`, a
    torch data set with :meth:`~LabeledImages.loader`). Arguments as :func:`load_dataset`."""
    spec = get_spec(name)
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    ids = resolve_classes(spec, classes)
    size = resolve_size(spec, image_size)
    root_path = Path(root).expanduser() if root is not None else None
    raw = spec.load_raw(split, root_path, bool(download))

    pixels, labels = _as_tensor(raw.images), np.asarray(raw.labels, dtype=np.int64).reshape(-1)
    if pixels.dim() != 4 or pixels.shape[0] != labels.shape[0] or pixels.shape[1] != spec.channels:
        raise DatasetError(
            f"{spec.name} ({raw.source}): expected images N x {spec.channels} x H x W with one label each, "
            f"got images {tuple(pixels.shape)} and {labels.shape[0]} labels; the files may be corrupt"
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
        pixels, labels = pixels[torch.from_numpy(keep)], lut[labels[keep]]

    y = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    info = make_info(spec, ids, size, split, raw.source, spec.class_names_from(raw), raw.split_seed)
    return LabeledImages(pixels, y, info)


def load_dataset(
    name: str,
    split: str = "train",
    root: str | os.PathLike | None = None,
    download: bool = False,
    classes: Any = None,
    image_size: int | None = None,
) -> ArrayDataset:
    """Load one split of a registered data set into memory as float tensors
    (:func:`open_dataset` reads it without converting it all at once).

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
    return open_dataset(name, split, root, download, classes, image_size).to_arrays()


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



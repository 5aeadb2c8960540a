"""Real data sets as in-memory tensors: registry, readers for the on-disk formats, class subsets.

Every data set comes back as an :class:`ArrayDataset`: one float32 ``N x C x H x W`` tensor in
``[0, 1]`` and one int64 label tensor, both on the CPU, plus a :class:`DatasetInfo` that
describes them (class names, original class ids, image shape, the per-channel mean/std a
teacher trained on this data set normalises with, where the files came from). There is no
``DataLoader``: :meth:`ArrayDataset.batches` slices the tensors directly, which is what the
small data sets of data-free distillation need, and it keeps tests fast.

Registered data sets (:func:`list_datasets`):

=================  ======  =====  ==========================================================
name               shape   cls.   source
=================  ======  =====  ==========================================================
``digits``         1x32x32   10   scikit-learn ``load_digits`` (8x8), fixed stratified split
``mnist``          1x32x32   10   IDX files (``root``, ``root/MNIST/raw``; torchvision download)
``fashion-mnist``  1x32x32   10   IDX files (``root``, ``root/FashionMNIST/raw``,
                                  ``root/fashion-mnist``, Debian ``dataset-fashion-mnist``)
``cifar10``        3x32x32   10   python pickle batches ``cifar-10-batches-py``
``cifar100``       3x32x32  100   python pickle files ``cifar-100-python`` (fine labels)
``svhn``           3x32x32   10   ``train_32x32.mat`` / ``test_32x32.mat`` (label 10 -> 0)
=================  ======  =====  ==========================================================

Security: the CIFAR files are pickles. They are read with :class:`RestrictedUnpickler`, which
resolves only the handful of numpy globals that rebuild arrays and refuses everything else
with a :class:`DatasetError` before any of it runs.

Nothing is cached on disk: every call decodes the files again (Fashion-MNIST's 60,000 images
take one to three seconds on one CPU thread).

Adding a data set::

    @register_dataset("my-set")
    class MySet(DatasetSpec):
        class_names = ("a", "b")
        channels, native_size = 3, 32
        mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

        def load_raw(self, split, root, download):
            ...  # -> RawSplit(images uint8 N x C x H x W, labels int64 N, source)
"""
from __future__ import annotations

import gzip
import numbers
import os
import pickle
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "ArrayDataset",
    "DatasetError",
    "DatasetInfo",
    "DatasetSpec",
    "RawSplit",
    "RestrictedUnpickler",
    "dataset_info",
    "default_data_root",
    "list_datasets",
    "load_dataset",
    "parse_classes",
    "read_idx",
    "register_dataset",
]

#: Where Debian's package ``dataset-fashion-mnist`` installs the IDX files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

#: Number of images converted/resized at once (bounds the temporary memory).
_RESIZE_CHUNK = 4096

SPLITS = ("train", "test")


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

    ``images``: ``N x C x H x W`` numpy array, either uint8 (0..255) or floating in ``[0, 1]``.
    ``labels``: int64 numpy vector with values ``0 .. num_classes - 1`` of the full data set.
    ``source``: where the data came from (a path, or ``"sklearn"``).
    """

    images: np.ndarray
    labels: np.ndarray
    source: str
    split_seed: int | None = None


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


class DatasetSpec:
    """Describes one data set and knows how to read its files.

    Subclasses set the class attributes and implement :meth:`load_raw`. ``name`` is filled in
    by :func:`register_dataset`.
    """

    name: str = ""
    class_names: tuple[str, ...] = ()
    channels: int = 1
    native_size: int = 32
    default_image_size: int = 32
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    split_seed: int | None = None
    #: ``source`` reported by :func:`dataset_info` (which does not look for files).
    static_source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def load_raw(self, split: str, root: Path | None, download: bool) -> RawSplit:  # pragma: no cover
        raise NotImplementedError("abstract: each data set spec implements load_raw()")

    def class_names_from(self, raw: RawSplit) -> list[str]:
        """Class names for a loaded split (defaults to the constant ``class_names``)."""
        return list(self.class_names)


_REGISTRY: dict[str, DatasetSpec] = {}


def _key(name: str) -> str:
    return str(name).strip().lower().replace("_", "-")


def register_dataset(name: str) -> Callable[[Any], Any]:
    """Decorator that registers a data set under ``name``.

    It accepts a :class:`DatasetSpec` subclass (instantiated without arguments), a spec
    instance, or a zero-argument function that returns a spec. The decorated object is
    returned unchanged. Names are case-insensitive and ``_`` equals ``-``.
    """
    if not isinstance(name, str) or not name.strip():
        raise DatasetError(f"a data set name must be a non-empty string, got {name!r}")

    def decorator(obj: Any) -> Any:
        spec = obj
        if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "load_raw")):
            spec = obj()
        missing = [a for a in ("class_names", "channels", "mean", "std", "load_raw") if not hasattr(spec, a)]
        if missing:
            raise DatasetError(f"cannot register {name!r}: the spec lacks {', '.join(missing)}")
        if len(spec.mean) != spec.channels or len(spec.std) != spec.channels:
            raise DatasetError(f"cannot register {name!r}: mean/std need one value per channel ({spec.channels})")
        key = _key(name)
        if key in _REGISTRY and _REGISTRY[key] is not spec:
            raise DatasetError(f"a data set named {name!r} is already registered; choose another name")
        spec.name = key
        _REGISTRY[key] = spec
        return obj

    return decorator


def list_datasets() -> list[str]:
    """Names of the registered data sets, sorted."""
    return sorted(_REGISTRY)


def _get_spec(name: str) -> DatasetSpec:
    spec = _REGISTRY.get(_key(name)) if isinstance(name, str) else None
    if spec is None:
        raise DatasetError(f"unknown data set {name!r}; known data sets: {', '.join(list_datasets())}")
    return spec


# ---------------------------------------------------------------------------------------------
# Class subsets and sizes
# ---------------------------------------------------------------------------------------------

_RANGE_RE = re.compile(r"^\s*(-?\d+)\s*(?:-\s*(-?\d+)\s*)?$")


def parse_classes(text_or_list: str | Sequence[int] | int | None) -> list[int] | None:
    """Parse a class selection into a list of class ids (order kept), or ``None`` for all.

    Accepts ``None``, ``""`` or ``"all"`` (all classes), ``"0,1,2"``, ranges ``"0-4"``
    (inclusive), mixtures ``"0-4,7"``, a single int, or a list/tuple of ints. Duplicates,
    negative ids, reversed ranges, non-integers and an empty list raise :class:`DatasetError`.
    Whether ids are below the number of classes is checked when a data set is chosen.
    """
    if text_or_list is None:
        return None
    if isinstance(text_or_list, str):
        text = text_or_list.strip()
        if text == "" or text.lower() == "all":
            return None
        ids: list[int] = []
        for part in text.split(","):
            m = _RANGE_RE.match(part)
            if not m:
                raise DatasetError(
                    f"cannot parse class selection {text_or_list!r} (bad part {part.strip()!r}); "
                    "use comma-separated ids and inclusive ranges, e.g. '0,1,2', '0-4' or '0-4,7'"
                )
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            if hi < lo:
                raise DatasetError(f"reversed class range {part.strip()!r} in {text_or_list!r}; write it as '{hi}-{lo}'")
            ids.extend(range(lo, hi + 1))
    elif isinstance(text_or_list, bool):
        raise DatasetError(f"class selection must be ids, got {text_or_list!r}")
    elif isinstance(text_or_list, numbers.Integral):
        ids = [int(text_or_list)]
    else:
        try:
            items = list(text_or_list.tolist() if hasattr(text_or_list, "tolist") else text_or_list)
        except TypeError:
            raise DatasetError(f"class selection must be a string or a list of ints, got {text_or_list!r}") from None
        bad = [c for c in items if isinstance(c, bool) or not isinstance(c, numbers.Integral)]
        if bad:
            raise DatasetError(f"class ids must be integers, got {bad!r} in {text_or_list!r}")
        ids = [int(c) for c in items]
    if not ids:
        raise DatasetError("empty class selection; give at least one class id, or None for all classes")
    negative = [c for c in ids if c < 0]
    if negative:
        raise DatasetError(f"class ids must be >= 0, got {negative}")
    dups = sorted({c for c in ids if ids.count(c) > 1})
    if dups:
        raise DatasetError(f"duplicate class ids {dups} in {text_or_list!r}; list each class once")
    return ids


def _resolve_classes(spec: DatasetSpec, classes: Any) -> list[int]:
    """Validated original class ids in label order (all classes when ``classes`` is None)."""
    n = spec.num_classes
    ids = parse_classes(classes)
    if ids is None:
        return list(range(n))
    bad = [c for c in ids if c >= n]
    if bad:
        raise DatasetError(f"class ids {bad} are out of range for {spec.name!r}: valid ids are 0..{n - 1}")
    return ids


def _resolve_size(spec: DatasetSpec, image_size: Any) -> int:
    if image_size is None:
        return int(spec.default_image_size)
    if isinstance(image_size, (tuple, list)) and len(image_size) == 2 and image_size[0] == image_size[1]:
        image_size = image_size[0]
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < 1:
        raise DatasetError(f"image_size must be a positive integer (square side in pixels), got {image_size!r}")
    return int(image_size)


def _make_info(spec: DatasetSpec, ids: list[int], size: int, split: str, source: str, names: list[str], split_seed) -> DatasetInfo:
    return DatasetInfo(
        name=spec.name,
        num_classes=len(ids),
        class_names=[names[c] for c in ids],
        classes=list(ids),
        image_shape=(int(spec.channels), size, size),
        mean=tuple(float(m) for m in spec.mean),
        std=tuple(float(s) for s in spec.std),
        source=source,
        split=split,
        split_seed=split_seed,
    )


def dataset_info(name: str, classes: Any = None, image_size: int | None = None) -> DatasetInfo:
    """The :class:`DatasetInfo` of the training split, built without reading any file.

    ``source`` is ``"sklearn"`` for ``digits`` and ``""`` for file-based data sets (where the
    files are is only known once they are loaded).
    """
    spec = _get_spec(name)
    ids = _resolve_classes(spec, classes)
    size = _resolve_size(spec, image_size)
    return _make_info(spec, ids, size, "train", spec.static_source, list(spec.class_names), spec.split_seed)


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
    spec = _get_spec(name)
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    ids = _resolve_classes(spec, classes)
    size = _resolve_size(spec, image_size)
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
    info = _make_info(spec, ids, size, split, raw.source, spec.class_names_from(raw), raw.split_seed)
    return ArrayDataset(images=x, labels=y, info=info)


def _search_roots(root: Path | None) -> list[Path]:
    return [root] if root is not None else [default_data_root()]


def _download_root(root: Path | None) -> Path:
    path = root if root is not None else default_data_root()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _download_failed(name: str, root: Path, err: Exception) -> DatasetError:
    return DatasetError(
        f"downloading {name} into {root} failed ({type(err).__name__}: {err}); check the network, "
        f"or put the files there yourself and pass --data-root {root}"
    )


def _not_found(name: str, searched: list[Path], layout: str, extra: str = "") -> DatasetError:
    where = ", ".join(str(p) for p in searched) or "(nothing)"
    return DatasetError(
        f"{name} not found (searched: {where}). {extra}"
        f"Pass --data-root DIR (root=DIR) where DIR holds {layout}, "
        f"or --download (download=True) to fetch it with torchvision."
    )


# ---------------------------------------------------------------------------------------------
# IDX (MNIST / Fashion-MNIST)
# ---------------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _read_bytes(path: Path) -> bytes:
    """File contents, gunzipped when the name ends in ``.gz``."""
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as err:
        raise DatasetError(f"cannot read {path}: {err}; the file is corrupt or truncated, fetch it again") from None
    return data


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), plain or gzipped, into a native-endian numpy array.

    Checks the magic number (two zero bytes, a known type code, the number of dimensions) and
    that the payload has exactly the announced size; anything else raises
    :class:`DatasetError` naming the file.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES or data[3] == 0:
        raise DatasetError(f"{path} is not an IDX file (bad magic number {data[:4].hex() or 'empty'}); fetch it again")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path} is truncated (header cut short); fetch it again")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise DatasetError(
            f"{path} is truncated or corrupt: header announces shape {dims} ({expected} bytes of data), "
            f"file holds {len(data) - header}; fetch it again"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=False) if dtype.itemsize > 1 else arr


_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


class _IdxSpec(DatasetSpec):
    """MNIST-layout data set: four IDX files, 28x28 grayscale."""

    channels = 1
    native_size = 28
    default_image_size = 32
    torchvision_class = ""  # name of the torchvision dataset class used for downloading
    subdirs: tuple[str, ...] = ()  # searched below each root, after the root itself
    system_dirs: tuple[Path, ...] = ()
    layout = ("the IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
              "t10k-labels-idx1-ubyte (each plain or .gz)")
    install_hint = ""

    def _dirs(self, root: Path | None) -> list[Path]:
        dirs = []
        for r in _search_roots(root):
            dirs += [r] + [r / s for s in self.subdirs]
        return dirs + list(self.system_dirs)

    def _locate(self, split: str, dirs: list[Path]) -> tuple[Path, Path] | None:
        img_stem, lbl_stem = _IDX_FILES[split]
        for d in dirs:
            img, lbl = _find_file(d, img_stem), _find_file(d, lbl_stem)
            if img is not None and lbl is not None:
                return img, lbl
        return None

    def load_raw(self, split: str, root: Path | None, download: bool) -> RawSplit:
        dirs = self._dirs(root)
        found = self._locate(split, dirs)
        if found is None and download:
            target = _download_root(root)
            import torchvision.datasets as tvd

            try:
                getattr(tvd, self.torchvision_class)(str(target), train=(split == "train"), download=True)
            except Exception as err:  # network errors come in many types
                raise _download_failed(self.name, target, err) from None
            found = self._locate(split, [target / self.torchvision_class / "raw"])
        if found is None:
            raise _not_found(self.name, dirs, self.layout, self.install_hint)
        img_path, lbl_path = found
        images, labels = read_idx(img_path), read_idx(lbl_path)
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DatasetError(
                f"{img_path} / {lbl_path}: expected N x H x W images and N labels, got {images.shape} and "
                f"{labels.shape}; the files do not belong together, fetch them again"
            )
        return RawSplit(images[:, None], labels.astype(np.int64), source=str(img_path.parent))


@register_dataset("mnist")
class MNIST(_IdxSpec):
    """MNIST handwritten digits, 60k/10k, resized 28 -> 32 by default.

    mean/std: the customary 28-px training-set values (0.1307, 0.3081); no copy of MNIST was
    available here to recompute them at 32 px (upsampling changes them by < 0.01).
    """

    class_names = tuple(str(i) for i in range(10))
    mean, std = (0.1307,), (0.3081,)
    torchvision_class = "MNIST"
    subdirs = ("MNIST/raw", "mnist")


@register_dataset("fashion-mnist")
class FashionMNIST(_IdxSpec):
    """Zalando's Fashion-MNIST, 60k/10k, resized 28 -> 32 by default (as in DAFL/ZSKD).

    mean/std: computed once on the 32-px training split (see ``tests/test_data.py``).
    """

    class_names = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
    mean, std = (0.2854,), (0.3384,)
    torchvision_class = "FashionMNIST"
    subdirs = ("FashionMNIST/raw", "fashion-mnist", "fashion-mnist/raw")
    install_hint = "On Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist (installs it in /usr/share/datasets/fashion-mnist). "

    @property
    def system_dirs(self) -> tuple[Path, ...]:  # read at call time so tests can monkeypatch it
        return (DEBIAN_FASHION_MNIST_DIR,)


# ---------------------------------------------------------------------------------------------
# scikit-learn digits
# ---------------------------------------------------------------------------------------------


@register_dataset("digits")
class Digits(DatasetSpec):
    """scikit-learn's bundled ``load_digits``: 1,797 8x8 images (values 0..16, scaled by 1/16).

    A fixed stratified split ``train_test_split(test_size=0.25, stratify=y, random_state=0)``
    gives 1,347 training and 450 test images. Resized 8 -> 32 by default. mean/std computed
    once on the 32-px training split (checked by a test).
    """

    class_names = tuple(str(i) for i in range(10))
    channels, native_size, default_image_size = 1, 8, 32
    mean, std = (0.3052,), (0.3235,)
    split_seed = 0
    static_source = "sklearn"

    def load_raw(self, split: str, root: Path | None, download: bool) -> RawSplit:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        bunch = load_digits()
        images = (bunch.images.astype(np.float32) / 16.0)[:, None]
        labels = bunch.target.astype(np.int64)
        train_idx, test_idx = train_test_split(
            np.arange(len(labels)), test_size=0.25, stratify=labels, random_state=self.split_seed
        )
        idx = np.sort(train_idx if split == "train" else test_idx)
        return RawSplit(images[idx], labels[idx], source="sklearn", split_seed=self.split_seed)


# ---------------------------------------------------------------------------------------------
# CIFAR (restricted pickle)
# ---------------------------------------------------------------------------------------------


def _numpy_array_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core import multiarray as _ma, numeric as _num
    except ImportError:  # numpy < 2
        from numpy.core import multiarray as _ma, numeric as _num  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {}
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = _ma._reconstruct
        allowed[(f"{mod}.multiarray", "scalar")] = _ma.scalar
        if hasattr(_num, "_frombuffer"):
            allowed[(f"{mod}.numeric", "_frombuffer")] = _num._frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    # Python 3 pickles of bytes under protocol < 3 go through _codecs.encode(str, "latin1").
    allowed[("_codecs", "encode")] = __import__("codecs").encode
    for name in ("list", "dict", "tuple", "set", "frozenset", "bytearray", "bytes", "int", "float", "complex", "str"):
        allowed[("builtins", name)] = getattr(__import__("builtins"), name)
        allowed[("__builtin__", name)] = getattr(__import__("builtins"), name)
    return allowed


_PICKLE_ALLOWED = _numpy_array_globals()


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and plain containers, and nothing else.

    ``find_class`` resolves only a fixed table of (module, name) pairs (numpy's array
    reconstruction helpers, ``numpy.ndarray``, ``numpy.dtype``, ``_codecs.encode`` and plain
    builtin container/number types); any other global raises :class:`DatasetError` before it
    is imported or called. Persistent ids are refused by the base class.
    """

    source = "<pickle>"

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PICKLE_ALLOWED[(module, name)]
        except KeyError:
            raise DatasetError(
                f"refused to unpickle global {module}.{name} from {self.source}: data set pickles may only "
                "hold numpy arrays and plain containers. The file is not a genuine data set file; "
                "delete it and fetch the data set again"
            ) from None


def _load_pickle(path: Path) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler` (``encoding="bytes"``, as the CIFAR
    files were written by Python 2)."""
    try:
        with open(path, "rb") as fh:
            up = RestrictedUnpickler(fh, encoding="bytes")
            up.source = str(path)
            return up.load()
    except DatasetError:
        raise
    except Exception as err:  # UnpicklingError, EOFError, ValueError, ... from a corrupt file
        raise DatasetError(f"cannot unpickle {path} ({type(err).__name__}: {err}); the file is corrupt, fetch it again") from None


def _get(d: Any, key: str, path: Path) -> Any:
    if not isinstance(d, dict):
        raise DatasetError(f"{path} does not hold a dict as CIFAR batch files do (got {type(d).__name__})")
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DatasetError(f"{path} lacks the entry {key!r} (found {sorted(map(str, d))}); it is not a CIFAR batch file")


class _CifarSpec(DatasetSpec):
    channels, native_size, default_image_size = 3, 32, 32
    folder = ""
    train_files: tuple[str, ...] = ()
    test_files: tuple[str, ...] = ()
    meta_file = ""
    label_key = ""
    names_key = ""
    torchvision_class = ""

    def _locate(self, split: str, dirs: list[Path]) -> tuple[Path, list[Path]] | None:
        files = self.train_files if split == "train" else self.test_files
        for d in dirs:
            if all((d / f).is_file() for f in files):
                return d, [d / f for f in files]
        return None

    def load_raw(self, split: str, root: Path | None, download: bool) -> RawSplit:
        dirs = []
        for r in _search_roots(root):
            dirs += [r / self.folder, r]
        found = self._locate(split, dirs)
        if found is None and download:
            target = _download_root(root)
            import torchvision.datasets as tvd
            from torchvision.datasets.utils import download_and_extract_archive

            cls = getattr(tvd, self.torchvision_class)
            try:  # the archive only: torchvision's own CIFAR class would unpickle without restriction
                download_and_extract_archive(cls.url, str(target), filename=cls.filename, md5=cls.tgz_md5)
            except Exception as err:
                raise _download_failed(self.name, target, err) from None
            found = self._locate(split, [target / self.folder])
        if found is None:
            files = ", ".join(self.train_files + self.test_files)
            raise _not_found(self.name, dirs, f"{self.folder}/ with {files} (python pickle version)")
        folder, paths = found
        images, labels = [], []
        for path in paths:
            batch = _load_pickle(path)
            data = np.asarray(_get(batch, "data", path))
            lab = np.asarray(_get(batch, self.label_key, path), dtype=np.int64).reshape(-1)
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != lab.shape[0]:
                raise DatasetError(
                    f"{path}: expected uint8 data of shape N x 3072 and N labels, got {data.dtype} {data.shape} "
                    f"and {lab.shape[0]} labels; the file is corrupt"
                )
            images.append(data.reshape(-1, 3, 32, 32))  # each row is R(32x32), G, B, row-major
            labels.append(lab)
        return RawSplit(np.concatenate(images), np.concatenate(labels), source=str(folder))

    def class_names_from(self, raw: RawSplit) -> list[str]:
        """Names from the meta file when present and consistent, else the constants."""
        meta = Path(raw.source) / self.meta_file
        if meta.is_file():
            names = _get(_load_pickle(meta), self.names_key, meta)
            names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
            if len(names) == self.num_classes:
                return names
        return list(self.class_names)


@register_dataset("cifar10")
class CIFAR10(_CifarSpec):
    """CIFAR-10 (python version): ``cifar-10-batches-py/data_batch_1..5``, ``test_batch``."""

    class_names = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    meta_file, label_key, names_key = "batches.meta", "labels", "label_names"
    torchvision_class = "CIFAR10"


_CIFAR100_NAMES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly "
    "camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup "
    "dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower "
    "leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid "
    "otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road "
    "rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower "
    "sweet_pepper table tank telephone television tiger tractor train trout tulip turtle wardrobe whale "
    "willow_tree wolf woman worm"
).split()


@register_dataset("cifar100")
class CIFAR100(_CifarSpec):
    """CIFAR-100 (python version): ``cifar-100-python/train``, ``test``; the 100 fine labels."""

    class_names = tuple(_CIFAR100_NAMES)
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    folder = "cifar-100-python"
    train_files, test_files = ("train",), ("test",)
    meta_file, label_key, names_key = "meta", "fine_labels", "fine_label_names"
    torchvision_class = "CIFAR100"


# ---------------------------------------------------------------------------------------------
# SVHN (.mat)
# ---------------------------------------------------------------------------------------------


@register_dataset("svhn")
class SVHN(DatasetSpec):
    """Street View House Numbers, cropped digits: ``train_32x32.mat`` (73,257) and
    ``test_32x32.mat`` (26,032), searched in ``root``, ``root/svhn``, ``root/SVHN``. The label
    10 stands for the digit 0 and is mapped to 0."""

    class_names = tuple(str(i) for i in range(10))
    channels, native_size, default_image_size = 3, 32, 32
    mean, std = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)

    def load_raw(self, split: str, root: Path | None, download: bool) -> RawSplit:
        fname = f"{split}_32x32.mat"
        dirs = []
        for r in _search_roots(root):
            dirs += [r, r / "svhn", r / "SVHN"]
        path = next((d / fname for d in dirs if (d / fname).is_file()), None)
        if path is None and download:
            target = _download_root(root)
            import torchvision.datasets as tvd
            from torchvision.datasets.utils import download_url

            url, filename, md5 = tvd.SVHN.split_list[split]
            try:
                download_url(url, str(target), filename, md5)
            except Exception as err:
                raise _download_failed(self.name, target, err) from None
            path = target / fname if (target / fname).is_file() else None
        if path is None:
            raise _not_found(self.name, dirs, "train_32x32.mat and test_32x32.mat")
        import scipy.io

        try:
            mat = scipy.io.loadmat(str(path), variable_names=("X", "y"))
        except Exception as err:
            raise DatasetError(f"cannot read {path} ({type(err).__name__}: {err}); the file is corrupt, fetch it again") from None
        if "X" not in mat or "y" not in mat:
            raise DatasetError(f"{path} lacks the variables X and y; it is not an SVHN file")
        x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1).astype(np.int64)
        if x.ndim != 4 or x.shape[2] != 3 or x.shape[3] != y.shape[0] or x.dtype != np.uint8:
            raise DatasetError(f"{path}: expected uint8 X of shape H x W x 3 x N and N labels, got {x.dtype} {x.shape}, {y.shape[0]} labels")
        y[y == 10] = 0
        return RawSplit(x.transpose(3, 2, 0, 1), y, source=str(path.parent))

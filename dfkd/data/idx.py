"""MNIST and Fashion-MNIST from their IDX files."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from dfkd.data.loading import download_failed, download_root, not_found, search_roots
from dfkd.data.registry import DatasetSpec, register_dataset
from dfkd.data.types import DatasetError, RawSplit

#: Where Debian's package ``dataset-fashion-mnist`` installs the IDX files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

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
        for r in search_roots(root):
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
            target = download_root(root)
            import torchvision.datasets as tvd

            try:
                getattr(tvd, self.torchvision_class)(str(target), train=(split == "train"), download=True)
            except Exception as err:  # network errors come in many types
                raise download_failed(self.name, target, err) from None
            found = self._locate(split, [target / self.torchvision_class / "raw"])
        if found is None:
            raise not_found(self.name, dirs, self.layout, self.install_hint)
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



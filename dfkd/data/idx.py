"""MNIST and Fashion-MNIST from their IDX files, read by torchvision.

torchvision's ``read_sn3_pascalvincent_tensor`` (what ``torchvision.datasets.MNIST`` reads its
raw files with) parses the files; a ``.gz`` file (Debian's ``dataset-fashion-mnist`` installs
them so) is first gunzipped into a temporary folder with torchvision's ``extract_archive``.
What is checked here is only what torchvision leaves to assertions: the magic number and that
the payload has the size the header announces, so a bad file is a :class:`DatasetError` that
names it.
"""

from __future__ import annotations

import gzip
import os
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch

from dfkd.data.loading import download_failed, download_root, not_found, search_roots
from dfkd.data.registry import DatasetSpec, register_dataset
from dfkd.data.types import DatasetError, RawSplit

#: Where Debian's package ``dataset-fashion-mnist`` installs the IDX files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# ---------------------------------------------------------------------------------------------
# IDX (MNIST / Fashion-MNIST)
# ---------------------------------------------------------------------------------------------

#: Bytes per value of each IDX type code (the codes torchvision reads).
_IDX_ITEMSIZE = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}
_MAX_DIMS = 3  # torchvision reads IDX files of 1 to 3 dimensions


def _check_idx(plain: Path, name: Path) -> None:
    """The header of the uncompressed IDX file ``plain`` (reported as ``name``) and its size."""
    with open(plain, "rb") as handle:
        head = handle.read(4 + 4 * _MAX_DIMS)
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_ITEMSIZE or head[3] == 0:
        raise DatasetError(f"{name} is not an IDX file (bad magic number {head[:4].hex() or 'empty'}); fetch it again")
    ndim, header = head[3], 4 + 4 * head[3]
    if ndim > _MAX_DIMS:
        raise DatasetError(f"{name}: an IDX file of {ndim} dimensions; MNIST-layout files have 1 to {_MAX_DIMS}")
    if len(head) < header:
        raise DatasetError(f"{name} is truncated (header cut short); fetch it again")
    dims = tuple(int(d) for d in np.frombuffer(head, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * _IDX_ITEMSIZE[head[2]]
    held = plain.stat().st_size - header
    if held != expected:
        raise DatasetError(
            f"{name} is truncated or corrupt: header announces shape {dims} ({expected} bytes of data), "
            f"file holds {held}; fetch it again"
        )


def _read_idx_tensor(path: Path, reader=None) -> torch.Tensor:
    """``path`` (plain or ``.gz``) read by torchvision: ``reader`` (``read_image_file`` or
    ``read_label_file``), or the format's own reader when ``None``."""
    from torchvision.datasets import mnist
    from torchvision.datasets.utils import extract_archive

    read = reader or (lambda file: mnist.read_sn3_pascalvincent_tensor(file, strict=False))
    with tempfile.TemporaryDirectory(prefix="dfkd-idx-") as tmp:
        plain = path
        if path.suffix == ".gz":
            try:
                plain = Path(extract_archive(str(path), tmp))
            except (gzip.BadGzipFile, EOFError, zlib.error) as err:
                raise DatasetError(f"cannot read {path}: {err}; the file is corrupt or truncated, fetch it again") from None
            except OSError as err:  # reading it, or writing the temporary copy
                raise DatasetError(f"cannot unpack {path} into {tmp} ({err}); free space there or set TMPDIR, "
                                   "or unpack it yourself (gunzip) and pass its folder as --data-root") from None
        try:
            _check_idx(plain, path)
            return read(str(plain))
        except OSError as err:
            raise DatasetError(f"cannot read {path}: {err}; fetch it again") from None
        except (TypeError, ValueError, RuntimeError) as err:  # torchvision: wrong type or number of dimensions
            raise DatasetError(f"{path}: {err}; it is not the IDX file its name says, fetch it again") from None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), plain or gzipped, into a native-endian numpy array
    (parsed by torchvision's reader; see the module docstring).

    Checks the magic number (two zero bytes, a known type code, 1 to 3 dimensions) and that
    the payload has exactly the announced size; anything else raises :class:`DatasetError`
    naming the file.
    """
    return _read_idx_tensor(Path(path)).numpy()


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
        from torchvision.datasets.mnist import read_image_file, read_label_file

        images, labels = _read_idx_tensor(img_path, read_image_file), _read_idx_tensor(lbl_path, read_label_file)
        if images.shape[0] != labels.shape[0]:
            raise DatasetError(
                f"{img_path} / {lbl_path}: expected N x H x W images and N labels, got {tuple(images.shape)} and "
                f"{tuple(labels.shape)}; the files do not belong together, fetch them again"
            )
        return RawSplit(images[:, None], labels.numpy(), source=str(img_path.parent))


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



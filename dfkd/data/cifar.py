"""CIFAR-10/100 from their python pickles, read with a restricted unpickler."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from dfkd.data.loading import download_failed, download_root, not_found, search_roots
from dfkd.data.registry import DatasetSpec, register_dataset
from dfkd.data.types import DatasetError, RawSplit

# ---------------------------------------------------------------------------------------------
# CIFAR (restricted pickle)
# ---------------------------------------------------------------------------------------------


def _numpy_array_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core import multiarray as _ma
        from numpy._core import numeric as _num
    except ImportError:  # numpy < 2
        from numpy.core import multiarray as _ma  # type: ignore[no-redef]
        from numpy.core import numeric as _num
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
        for r in search_roots(root):
            dirs += [r / self.folder, r]
        found = self._locate(split, dirs)
        if found is None and download:
            target = download_root(root)
            import torchvision.datasets as tvd
            from torchvision.datasets.utils import download_and_extract_archive

            cls = getattr(tvd, self.torchvision_class)
            try:  # the archive only: torchvision's own CIFAR class would unpickle without restriction
                download_and_extract_archive(cls.url, str(target), filename=cls.filename, md5=cls.tgz_md5)
            except Exception as err:
                raise download_failed(self.name, target, err) from None
            found = self._locate(split, [target / self.folder])
        if found is None:
            files = ", ".join(self.train_files + self.test_files)
            raise not_found(self.name, dirs, f"{self.folder}/ with {files} (python pickle version)")
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



"""SVHN from its ``.mat`` files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dfkd.data.loading import download_failed, download_root, not_found, search_roots
from dfkd.data.registry import DatasetSpec, register_dataset
from dfkd.data.types import DatasetError, RawSplit

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
        for r in search_roots(root):
            dirs += [r, r / "svhn", r / "SVHN"]
        path = next((d / fname for d in dirs if (d / fname).is_file()), None)
        if path is None and download:
            target = download_root(root)
            import torchvision.datasets as tvd
            from torchvision.datasets.utils import download_url

            url, filename, md5 = tvd.SVHN.split_list[split]
            try:
                download_url(url, str(target), filename, md5)
            except Exception as err:
                raise download_failed(self.name, target, err) from None
            path = target / fname if (target / fname).is_file() else None
        if path is None:
            raise not_found(self.name, dirs, "train_32x32.mat and test_32x32.mat")
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

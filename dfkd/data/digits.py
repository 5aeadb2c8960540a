"""scikit-learn's bundled 8x8 digits, with a fixed stratified split."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dfkd.data.registry import DatasetSpec, register_dataset
from dfkd.data.types import RawSplit


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



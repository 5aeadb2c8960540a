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
from dfkd.data import digits, svhn  # noqa: F401  (registration)
from dfkd.data.cifar import RestrictedUnpickler
from dfkd.data.idx import read_idx
from dfkd.data.loading import default_data_root, load_dataset
from dfkd.data.registry import (
    DatasetSpec,
    dataset_info,
    list_datasets,
    parse_classes,
    register_dataset,
)
from dfkd.data.types import ArrayDataset, DatasetError, DatasetInfo, RawSplit

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

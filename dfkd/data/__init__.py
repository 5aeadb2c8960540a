"""Real data sets: registry, readers for the on-disk formats, class subsets, streamed splits.

:func:`open_dataset` gives a split as a :class:`LabeledImages`, a torch data set that keeps the
pixels as stored (uint8 at the native size) and converts an item, or a ``DataLoader`` batch
(:meth:`LabeledImages.loader`), to float32 in ``[0, 1]`` at the requested size when it is read:
memory holds the uint8 pixels, never the whole split as floats. :func:`load_dataset` converts
the whole split at once into an :class:`ArrayDataset`: one float32 ``N x C x H x W`` tensor in
``[0, 1]`` and one int64 label tensor, both on the CPU (:meth:`ArrayDataset.batches` slices
them directly, which keeps small data sets and tests fast). Both carry a :class:`DatasetInfo`
that describes them (class names, original class ids, image shape, the per-channel mean/std a
teacher trained on this data set normalises with, where the files came from), and both give
the same numbers, image for image.

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

Readers: the IDX files are parsed by torchvision (``torchvision.datasets.mnist``), plain or
gzipped, wherever they lie. CIFAR and SVHN are read here: torchvision's ``CIFAR10``/``CIFAR100``
and ``SVHN`` classes accept only the official files (an md5 check of each) in their own folder
layout, and the CIFAR classes unpickle without restriction.

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
from dfkd.data.loading import default_data_root, load_dataset, open_dataset
from dfkd.data.registry import (
    DatasetSpec,
    dataset_info,
    list_datasets,
    parse_classes,
    register_dataset,
)
from dfkd.data.stream import LabeledImages
from dfkd.data.types import ArrayDataset, DatasetError, DatasetInfo, RawSplit

__all__ = [
    "ArrayDataset",
    "DatasetError",
    "DatasetInfo",
    "DatasetSpec",
    "LabeledImages",
    "RawSplit",
    "RestrictedUnpickler",
    "dataset_info",
    "default_data_root",
    "list_datasets",
    "load_dataset",
    "open_dataset",
    "parse_classes",
    "read_idx",
    "register_dataset",
]

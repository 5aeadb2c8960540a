"""Tests for dfkd.data: registry, digits split, class subsets, on-disk readers, pickle safety.

The file-format tests write tiny files in the real on-disk layouts (IDX, CIFAR python pickles,
SVHN .mat) into ``tmp_path`` and load them through the public ``load_dataset``.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dfkd import data
from dfkd.data import (
    DatasetError,
    DatasetSpec,
    RawSplit,
    dataset_info,
    list_datasets,
    load_dataset,
    parse_classes,
    read_idx,
    register_dataset,
)


@pytest.fixture(autouse=True)
def _isolated_roots(tmp_path_factory, monkeypatch):
    """No test may pick up data from the user's default root."""
    monkeypatch.setenv("DFKD_DATA_ROOT", str(tmp_path_factory.mktemp("default_root")))


@pytest.fixture(scope="module")
def digits_train():
    return load_dataset("digits", "train")


@pytest.fixture(scope="module")
def digits_test():
    return load_dataset("digits", "test")


def _pop_std(x: torch.Tensor) -> list[float]:
    return x.double().std(dim=(0, 2, 3), unbiased=False).tolist()


# ------------------------------------------------------------------------------------ registry


def test_registry_lists_builtin_datasets_and_unknown_name_lists_them():
    names = list_datasets()
    for n in ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "svhn"):
        assert n in names
    with pytest.raises(DatasetError) as err:
        load_dataset("imagenet-9000")
    assert "imagenet-9000" in str(err.value) and "fashion-mnist" in str(err.value) and "digits" in str(err.value)
    with pytest.raises(DatasetError):
        dataset_info("nope")
    # names are case-insensitive and '_' == '-'
    assert dataset_info("Fashion_MNIST").name == "fashion-mnist"


def test_register_custom_dataset(monkeypatch):
    monkeypatch.setattr(data.registry.DATASETS, "_items", dict(data.registry.DATASETS._items))

    @register_dataset("toy-rgb")
    class Toy(DatasetSpec):
        class_names = ("a", "b", "c")
        channels, native_size, default_image_size = 3, 4, 4
        mean, std = (0.5,) * 3, (0.25,) * 3

        def load_raw(self, split, root, download):
            imgs = np.full((6, 3, 4, 4), 255, dtype=np.uint8)
            imgs[::2] = 0
            return RawSplit(imgs, np.array([0, 1, 2, 0, 1, 2]), source="memory")

    assert "toy-rgb" in list_datasets()
    ds = load_dataset("toy-rgb", classes=[2, 0])
    assert ds.labels.tolist() == [1, 0, 1, 0]  # originals 0, 2, 3, 5 with labels 0, 2, 0, 2
    assert ds.images[:, 0, 0, 0].tolist() == [0.0, 0.0, 1.0, 1.0]  # even indices are black
    assert ds.info.class_names == ["c", "a"] and ds.info.source == "memory"
    with pytest.raises(DatasetError, match="already registered"):
        register_dataset("toy-rgb")(Toy)


# -------------------------------------------------------------------------------------- digits


def test_digits_shapes_range_dtype(digits_train, digits_test):
    for ds, split in ((digits_train, "train"), (digits_test, "test")):
        assert ds.images.shape[1:] == (1, 32, 32)
        assert ds.images.dtype == torch.float32 and ds.labels.dtype == torch.int64
        assert ds.images.is_contiguous() and ds.images.device.type == "cpu"
        assert 0.0 <= ds.images.min().item() and ds.images.max().item() <= 1.0
        assert ds.images.max().item() > 0.9  # really scaled by 1/16, not 1/255
        assert set(ds.labels.tolist()) == set(range(10))
        assert ds.info.split == split and ds.info.split_seed == 0 and ds.info.source == "sklearn"
        assert ds.info.image_shape == (1, 32, 32) and ds.info.num_classes == 10
    assert len(digits_train) == 1347 and len(digits_test) == 450


def test_digits_split_is_stratified_deterministic_and_a_partition(digits_train, digits_test):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    total = np.bincount(bunch.target, minlength=10)
    test_counts = np.bincount(digits_test.labels.numpy(), minlength=10)
    train_counts = np.bincount(digits_train.labels.numpy(), minlength=10)
    assert (train_counts + test_counts == total).all()
    assert (np.abs(test_counts - 0.25 * total) <= 1).all()  # stratified

    again = load_dataset("digits", "train")
    assert torch.equal(again.images, digits_train.images) and torch.equal(again.labels, digits_train.labels)

    # at native size the pixels are exact; train + test must be the whole data set, each example once
    tr, te = load_dataset("digits", "train", image_size=8), load_dataset("digits", "test", image_size=8)
    both = torch.cat([tr.images, te.images]).reshape(-1, 64).numpy() * 16
    rows_split = np.concatenate([both, torch.cat([tr.labels, te.labels]).numpy()[:, None]], axis=1)
    rows_full = np.concatenate([bunch.data, bunch.target[:, None]], axis=1)
    assert rows_split.shape == rows_full.shape == (1797, 65)
    key = lambda a: a[np.lexsort(a.T[::-1])]
    assert np.allclose(key(rows_split), key(rows_full), atol=1e-5)


def test_digits_mean_std_constants_match_train_split(digits_train):
    info = dataset_info("digits")
    mean = digits_train.images.double().mean(dim=(0, 2, 3)).tolist()
    assert np.allclose(mean, info.mean, atol=1e-3)
    assert np.allclose(_pop_std(digits_train.images), info.std, atol=1e-3)


def test_dataset_info_without_files_matches_loaded(digits_train, monkeypatch, tmp_path):
    assert dataset_info("digits") == digits_train.info
    monkeypatch.setattr(data.idx, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "nothing")
    info = dataset_info("fashion-mnist", classes="0-2", image_size=28)
    assert info.num_classes == 3 and info.classes == [0, 1, 2]
    assert info.class_names == ["T-shirt/top", "Trouser", "Pullover"]
    assert info.image_shape == (1, 28, 28) and info.split == "train"
    c100 = dataset_info("cifar100")
    assert c100.num_classes == 100 and len(set(c100.class_names)) == 100 and c100.class_names[-1] == "worm"
    assert dataset_info("cifar10").image_shape == (3, 32, 32)


def test_image_size_resizes_with_antialiased_bilinear():
    native = load_dataset("digits", "test", image_size=8)
    small = load_dataset("digits", "test", image_size=16)
    assert small.images.shape[1:] == (1, 16, 16) and small.info.image_shape == (1, 16, 16)
    expected = F.interpolate(native.images, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    assert torch.allclose(small.images, expected.clamp(0, 1), atol=1e-6)
    assert native.images.max().item() == 1.0 and (native.images * 16 == (native.images * 16).round()).all()
    for bad in (0, -3, 2.5, "32", True):
        with pytest.raises(DatasetError, match="image_size"):
            load_dataset("digits", image_size=bad)


def test_to_meta_is_plain_and_round_trips_weights_only(digits_train, tmp_path):
    meta = digits_train.info.to_meta()
    assert meta["image_shape"] == [1, 32, 32] and isinstance(meta["mean"], list)
    assert meta["classes"] == list(range(10)) and meta["split_seed"] == 0
    torch.save({"meta": meta}, tmp_path / "m.pt")
    assert torch.load(tmp_path / "m.pt", weights_only=True)["meta"] == meta


def test_batches_cover_the_data_and_shuffle_reproducibly(digits_test):
    ds = digits_test
    plain = list(ds.batches(128))
    assert [len(y) for _, y in plain] == [128, 128, 128, 66]
    assert torch.equal(torch.cat([x for x, _ in plain]), ds.images)
    assert [len(y) for _, y in ds.batches(128, drop_last=True)] == [128, 128, 128]

    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s1 = list(ds.batches(100, shuffle=True, generator=g1))
    s2 = list(ds.batches(100, shuffle=True, generator=g2))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(s1, s2))
    ys = torch.cat([y for _, y in s1])
    assert not torch.equal(ys, ds.labels)
    assert torch.equal(ys.sort().values, ds.labels.sort().values)
    # images stay paired with their labels after shuffling
    xs = torch.cat([x for x, _ in s1])
    first = (ds.images == xs[0]).flatten(1).all(1).nonzero().flatten()
    assert ys[0].item() in ds.labels[first].tolist()
    with pytest.raises(DatasetError):
        next(ds.batches(0))


def test_bad_split_rejected():
    with pytest.raises(DatasetError, match="split"):
        load_dataset("digits", "validation")


# ------------------------------------------------------------------------------------ classes


def test_parse_classes_variants():
    assert parse_classes(None) is None
    assert parse_classes("") is None and parse_classes("all") is None
    assert parse_classes("0,1,2") == [0, 1, 2]
    assert parse_classes("0-4") == [0, 1, 2, 3, 4]
    assert parse_classes("0-4,7") == [0, 1, 2, 3, 4, 7]
    assert parse_classes(" 7 , 3 ") == [7, 3]
    assert parse_classes("8-9,0") == [8, 9, 0]
    assert parse_classes([0, 1]) == [0, 1]
    assert parse_classes((5,)) == [5]
    assert parse_classes(np.array([2, 4])) == [2, 4]
    assert parse_classes(6) == [6]
    for bad in ("1,1", "0-3,2", "a", "1,,2", "4-2", "1.5", [], [1, 1], [1.0], [-1], "-1", [True]):
        with pytest.raises(DatasetError):
            parse_classes(bad)


def test_class_subset_remaps_labels_and_keeps_original_ids(digits_train):
    sub = load_dataset("digits", "train", classes=[7, 3])
    full = digits_train
    assert sub.info.classes == [7, 3] and sub.info.num_classes == 2
    assert sub.info.class_names == ["7", "3"]
    assert sub.info.mean == full.info.mean and sub.info.std == full.info.std
    assert set(sub.labels.tolist()) == {0, 1}
    assert (sub.labels == 0).sum().item() == (full.labels == 7).sum().item()
    assert (sub.labels == 1).sum().item() == (full.labels == 3).sum().item()
    assert torch.equal(sub.images[sub.labels == 0], full.images[full.labels == 7])
    assert torch.equal(sub.images[sub.labels == 1], full.images[full.labels == 3])
    assert load_dataset("digits", "test", classes="0-4").info.classes == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "classes, needle",
    [([10], "10"), ([3, 12, 40], "[12, 40]"), ([1, 1], "duplicate"), ([], "empty"), ("2-11", "[10, 11]")],
)
def test_bad_class_ids_raise_with_ids_and_valid_range(classes, needle):
    with pytest.raises(DatasetError) as err:
        load_dataset("digits", classes=classes)
    assert needle in str(err.value)
    if "duplicate" not in needle and "empty" not in needle:
        assert "0..9" in str(err.value)
    with pytest.raises(DatasetError):
        dataset_info("digits", classes=classes)


# ----------------------------------------------------------------------------------------- IDX


def _idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[arr.dtype]
    header = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.tobytes()


def _write_idx_set(folder: Path, n_train=12, n_test=5, gz=True, seed=0):
    """Writes the four MNIST-layout files; returns {split: (images, labels)}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        imgs[:, 0, 0] = 255
        imgs[:, 27, 27] = 0
        labels = (np.arange(n) % 10).astype(np.uint8)
        for stem, arr in ((f"{prefix}-images-idx3-ubyte", imgs), (f"{prefix}-labels-idx1-ubyte", labels)):
            payload = _idx_bytes(arr)
            if gz:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(payload))
            else:
                (folder / stem).write_bytes(payload)
        out[split] = (imgs, labels)
    return out


@pytest.mark.parametrize(
    "name, sub, gz",
    [
        ("fashion-mnist", "FashionMNIST/raw", True),
        ("fashion-mnist", "", False),
        ("fashion-mnist", "fashion-mnist", True),
        ("mnist", "MNIST/raw", False),
        ("mnist", "", True),
    ],
)
def test_idx_layouts_load_with_exact_pixels(tmp_path, name, sub, gz):
    truth = _write_idx_set(tmp_path / sub if sub else tmp_path, gz=gz)
    for split in ("train", "test"):
        imgs, labels = truth[split]
        ds = load_dataset(name, split, root=tmp_path, image_size=28)
        assert ds.images.shape == (len(labels), 1, 28, 28)
        assert torch.equal(ds.labels, torch.from_numpy(labels.astype(np.int64)))
        assert torch.equal(ds.images[:, 0], torch.from_numpy(imgs).float() / 255)
        assert (ds.images[:, 0, 0, 0] == 1.0).all() and (ds.images[:, 0, 27, 27] == 0.0).all()
        assert ds.info.source == str(tmp_path / sub if sub else tmp_path)
    resized = load_dataset(name, "train", root=str(tmp_path))
    assert resized.images.shape[1:] == (1, 32, 32) and resized.info.image_shape == (1, 32, 32)
    assert 0.0 <= resized.images.min() and resized.images.max() <= 1.0


def test_idx_reader_plain_and_gz_and_wide_dtype(tmp_path):
    arr = (np.arange(24).reshape(2, 3, 4) - 5).astype(">i4")
    (tmp_path / "a.idx").write_bytes(_idx_bytes(arr))
    (tmp_path / "a.idx.gz").write_bytes(gzip.compress(_idx_bytes(arr)))
    for p in ("a.idx", "a.idx.gz"):
        got = read_idx(tmp_path / p)
        assert got.shape == (2, 3, 4) and got.dtype.isnative and np.array_equal(got, arr)


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_or_corrupt_idx_raises_naming_the_file(tmp_path, gz):
    _write_idx_set(tmp_path, gz=gz)
    stem = "train-images-idx3-ubyte" + (".gz" if gz else "")
    path = tmp_path / stem
    full = path.read_bytes()
    path.write_bytes(full[: len(full) - 100])
    with pytest.raises(DatasetError) as err:
        load_dataset("fashion-mnist", "train", root=tmp_path)
    assert stem in str(err.value)
    # bad magic number
    payload = b"\x08\x03\x00\x00" + (gzip.decompress(full) if gz else full)[4:]
    path.write_bytes(gzip.compress(payload) if gz else payload)
    with pytest.raises(DatasetError, match="magic"):
        load_dataset("fashion-mnist", "train", root=tmp_path)
    # the test split is intact and still loads
    assert len(load_dataset("fashion-mnist", "test", root=tmp_path)) == 5


def test_idx_images_and_labels_count_mismatch(tmp_path):
    _write_idx_set(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(3, dtype=np.uint8)))
    with pytest.raises(DatasetError, match="t10k"):
        load_dataset("mnist", "test", root=tmp_path)


def test_missing_dataset_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data.idx, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-such-dir")
    for root in (None, tmp_path / "empty"):
        with pytest.raises(DatasetError) as err:
            load_dataset("fashion-mnist", root=root)
        msg = str(err.value)
        assert "apt-get install dataset-fashion-mnist" in msg and "--data-root" in msg and "--download" in msg
    for name in ("mnist", "cifar10", "cifar100", "svhn"):
        with pytest.raises(DatasetError) as err:
            load_dataset(name, root=tmp_path)
        assert "--data-root" in str(err.value) and "--download" in str(err.value)


# --------------------------------------------------------------------------------------- CIFAR


def _cifar_rows(n, seed):
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    rows[:, 0] = 255  # R channel, pixel (0, 0)
    rows[:, 1024 + 33] = 0  # G channel, pixel (1, 1)
    return rows


def _dump(obj, path: Path, protocol=2):
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=protocol)


def _write_cifar10(root: Path, per_batch=4, protocol=2):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rows, labels = [], []
    for i in range(1, 6):
        r = _cifar_rows(per_batch, i)
        lab = [(i + j) % 10 for j in range(per_batch)]
        _dump({b"batch_label": b"training batch", b"data": r, b"labels": lab, b"filenames": [b"x.png"] * per_batch},
              folder / f"data_batch_{i}", protocol)
        rows.append(r)
        labels += lab
    test_rows = _cifar_rows(3, 99)
    _dump({b"data": test_rows, b"labels": [9, 0, 5]}, folder / "test_batch", protocol)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _dump({b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072}, folder / "batches.meta", protocol)
    return np.concatenate(rows), np.array(labels), test_rows


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_pickle_batches(tmp_path, protocol):
    rows, labels, test_rows = _write_cifar10(tmp_path, protocol=protocol)
    ds = load_dataset("cifar10", "train", root=tmp_path)
    assert ds.images.shape == (20, 3, 32, 32) and ds.info.image_shape == (3, 32, 32)
    assert ds.labels.tolist() == labels.tolist()
    chw = torch.from_numpy(rows.reshape(-1, 3, 32, 32)).float() / 255
    assert torch.equal(ds.images, chw)
    # row-major CHW: element c*1024 + h*32 + w of the 3072-vector is pixel (c, h, w)
    assert ds.images[2, 1, 5, 7].item() == pytest.approx(rows[2, 1024 + 5 * 32 + 7] / 255)
    assert ds.images[3, 2, 31, 0].item() == pytest.approx(rows[3, 2048 + 31 * 32] / 255)
    assert (ds.images[:, 0, 0, 0] == 1.0).all() and (ds.images[:, 1, 1, 1] == 0.0).all()
    assert ds.info.class_names[0] == "airplane" and ds.info.source == str(tmp_path / "cifar-10-batches-py")
    test = load_dataset("cifar10", "test", root=tmp_path / "cifar-10-batches-py", classes=[5, 9])
    assert test.labels.tolist() == [1, 0] and test.info.class_names == ["dog", "truck"]
    assert torch.equal(test.images[1], torch.from_numpy(test_rows[2].reshape(3, 32, 32)).float() / 255)


def test_cifar100_pickle_files(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rows = _cifar_rows(6, 1)
    fine, coarse = [0, 99, 42, 7, 99, 1], [0, 19, 5, 3, 19, 1]
    _dump({b"filenames": [b"f"] * 6, b"batch_label": b"training batch 1 of 1", b"fine_labels": fine,
           b"coarse_labels": coarse, b"data": rows}, folder / "train")
    _dump({b"fine_labels": [3], b"coarse_labels": [0], b"data": rows[:1]}, folder / "test")
    names = [n.encode() for n in dataset_info("cifar100").class_names]
    _dump({b"fine_label_names": names, b"coarse_label_names": [b"c"] * 20}, folder / "meta")
    ds = load_dataset("cifar100", "train", root=tmp_path)
    assert ds.labels.tolist() == fine and ds.info.num_classes == 100
    assert torch.equal(ds.images, torch.from_numpy(rows.reshape(-1, 3, 32, 32)).float() / 255)
    assert ds.info.class_names[99] == "worm" and ds.info.class_names[42] == "leopard"
    sub = load_dataset("cifar100", "train", root=tmp_path, classes=[99, 0])
    assert sub.labels.tolist() == [1, 0, 0] and sub.info.classes == [99, 0]
    assert len(load_dataset("cifar100", "test", root=tmp_path)) == 1


class _Payload:
    """Pickles into a call of os.mkdir(marker) when unpickled without restriction."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_malicious_cifar_pickle_is_refused_and_payload_does_not_run(tmp_path, protocol):
    rows, _, _ = _write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    _dump({b"data": rows[:4], b"labels": [0, 1, 2, 3], b"evil": _Payload(marker)}, folder / "data_batch_3", protocol)
    # sanity: an unrestricted unpickler WOULD run it
    probe = tmp_path / "probe.pkl"
    _dump(_Payload(tmp_path / "probe_ran"), probe, protocol)
    pickle.loads(probe.read_bytes())
    assert (tmp_path / "probe_ran").exists()

    with pytest.raises(DatasetError) as err:
        load_dataset("cifar10", "train", root=tmp_path)
    assert "refused to unpickle" in str(err.value) and "mkdir" in str(err.value)
    assert "data_batch_3" in str(err.value)
    assert not marker.exists()
    # other dangerous globals are refused too
    for module, name in (("builtins", "eval"), ("os", "system"), ("builtins", "getattr"), ("numpy", "load")):
        evil = b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\nq\x00."
        (folder / "test_batch").write_bytes(evil)
        with pytest.raises(DatasetError, match=f"refused to unpickle global {module}.{name}"):
            load_dataset("cifar10", "test", root=tmp_path)


def test_corrupt_cifar_pickle_raises(tmp_path):
    _write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DatasetError, match="test_batch"):
        load_dataset("cifar10", "test", root=tmp_path)
    _dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, path)
    with pytest.raises(DatasetError, match="3072"):
        load_dataset("cifar10", "test", root=tmp_path)


# ---------------------------------------------------------------------------------------- SVHN


@pytest.mark.parametrize("sub", ["", "svhn"])
def test_svhn_mat_files(tmp_path, sub):
    import scipy.io

    folder = tmp_path / sub
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    n = 7
    X = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
    X[0, 0, 0, :] = 255
    y = np.array([[10], [1], [2], [10], [9], [5], [3]], dtype=np.uint8)
    scipy.io.savemat(folder / "train_32x32.mat", {"X": X, "y": y})
    scipy.io.savemat(folder / "test_32x32.mat", {"X": X[..., :2], "y": y[:2]})
    ds = load_dataset("svhn", "train", root=tmp_path)
    assert ds.labels.tolist() == [0, 1, 2, 0, 9, 5, 3]
    assert ds.images.shape == (n, 3, 32, 32)
    assert torch.equal(ds.images, torch.from_numpy(X.transpose(3, 2, 0, 1).copy()).float() / 255)
    assert ds.images[4, 1, 3, 17].item() == pytest.approx(X[3, 17, 1, 4] / 255)
    assert (ds.images[:, 0, 0, 0] == 1.0).all()
    zeros = load_dataset("svhn", "train", root=tmp_path, classes=[0])
    assert len(zeros) == 2 and zeros.info.class_names == ["0"]
    assert len(load_dataset("svhn", "test", root=tmp_path)) == 2
    (folder / "test_32x32.mat").write_bytes(b"MATLAB garbage")
    with pytest.raises(DatasetError, match="test_32x32.mat"):
        load_dataset("svhn", "test", root=tmp_path)


# ------------------------------------------------------------------------ real Fashion-MNIST


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_debian_package():
    train = load_dataset("fashion-mnist", "train")
    test = load_dataset("fashion-mnist", "test", classes=[9])
    assert len(train) == 60000 and train.images.shape == (60000, 1, 32, 32)
    assert len(test) == 1000 and test.info.class_names == ["Ankle boot"] and (test.labels == 0).all()
    assert train.info.source == "/usr/share/datasets/fashion-mnist"
    assert np.bincount(train.labels.numpy(), minlength=10).tolist() == [6000] * 10
    std, mean = torch.std_mean(train.images, dim=(0, 2, 3), unbiased=False)
    assert np.allclose(mean.tolist(), train.info.mean, atol=1e-3)
    assert np.allclose(std.tolist(), train.info.std, atol=1e-3)


# ------------------------------------------------------------------ download wiring (no network)


def test_download_fetches_into_root_and_reads_the_raw_files(tmp_path, monkeypatch):
    import torchvision.datasets as tvd
    import torchvision.datasets.utils as tvu

    monkeypatch.setattr(data.idx, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-such-dir")
    calls = []

    class FakeFashionMNIST:  # stands in for torchvision's class: writes the raw files
        def __init__(self, root, train=True, download=False):
            calls.append((root, train, download))
            _write_idx_set(Path(root) / "FashionMNIST" / "raw", n_train=4, n_test=2)

    monkeypatch.setattr(tvd, "FashionMNIST", FakeFashionMNIST)
    with pytest.raises(DatasetError):  # download is opt-in
        load_dataset("fashion-mnist", "test", root=tmp_path / "dl")
    ds = load_dataset("fashion-mnist", "test", root=tmp_path / "dl", download=True)
    assert len(ds) == 2 and calls == [(str(tmp_path / "dl"), False, True)]
    assert ds.info.source == str(tmp_path / "dl" / "FashionMNIST" / "raw")

    def fake_archive(url, download_root, filename=None, md5=None, **kw):
        assert "cifar-10" in url and md5 == tvd.CIFAR10.tgz_md5
        _write_cifar10(Path(download_root))

    monkeypatch.setattr(tvu, "download_and_extract_archive", fake_archive)
    assert len(load_dataset("cifar10", "test", root=tmp_path / "c10", download=True)) == 3

    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(tvu, "download_and_extract_archive", offline)
    with pytest.raises(DatasetError, match="downloading cifar100 .* failed .*Network is unreachable"):
        load_dataset("cifar100", root=tmp_path / "c100", download=True)

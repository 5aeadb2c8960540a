"""Streamed data: torchvision-backed readers, splits converted a batch at a time, evaluation
through a DataLoader, and DistributedSampler shares of a transfer set."""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dfkd.data import DatasetError, LabeledImages, load_dataset, open_dataset, read_idx
from dfkd.data.sampling import RandomBatches, ShareBatches
from dfkd.engine.evaluation import EvalData, ImageView, match_rate, predict
from generators import create_synthesizer


@pytest.fixture(autouse=True)
def _isolated_roots(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DFKD_DATA_ROOT", str(tmp_path_factory.mktemp("default_root")))


def _idx(arr: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i2"): 0x0B}[arr.dtype]
    return bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.tobytes()


def _write_fashion(folder: Path, n: int, gz: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(n)
    folder.mkdir(parents=True, exist_ok=True)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    for split in ("train", "t10k"):
        for stem, arr in ((f"{split}-images-idx3-ubyte", images), (f"{split}-labels-idx1-ubyte", labels)):
            payload = _idx(arr)
            (folder / (stem + ".gz" if gz else stem)).write_bytes(gzip.compress(payload) if gz else payload)
    return images, labels


def _all(split: LabeledImages, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*split.loader(batch_size))
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_through_torchvision_gives_the_written_pixels_streamed_or_whole(tmp_path, gz):
    images, labels = _write_fashion(tmp_path / "fm", 23, gz)
    split = open_dataset("fashion-mnist", "test", root=tmp_path / "fm")
    assert split.pixels.dtype == torch.uint8 and tuple(split.pixels.shape) == (23, 1, 28, 28)  # stored, not floats
    expected = F.interpolate(torch.from_numpy(images)[:, None].float() / 255, size=(32, 32), mode="bilinear",
                             antialias=True, align_corners=False).clamp(0, 1)
    streamed, streamed_labels = _all(split, 5)
    whole = load_dataset("fashion-mnist", "test", root=tmp_path / "fm")
    assert torch.equal(streamed, expected) and torch.equal(whole.images, expected)
    assert torch.equal(streamed_labels, torch.from_numpy(labels.astype(np.int64))) and torch.equal(whole.labels, streamed_labels)
    assert torch.equal(split[7][0], expected[7]) and int(split[7][1]) == int(labels[7])
    native = open_dataset("fashion-mnist", "train", root=tmp_path / "fm", image_size=28, classes=[4, 2])
    keep = np.isin(labels, [4, 2])
    assert torch.equal(_all(native, 4)[0][:, 0], torch.from_numpy(images[keep]).float() / 255)


def test_read_idx_parses_wide_types_and_names_a_bad_file(tmp_path):
    arr = (np.arange(30).reshape(5, 6) - 7).astype(">i2")
    (tmp_path / "w.idx.gz").write_bytes(gzip.compress(_idx(arr)))
    got = read_idx(tmp_path / "w.idx.gz")
    assert got.dtype.isnative and np.array_equal(got, arr)
    (tmp_path / "x.idx").write_bytes(_idx(arr)[:-3])
    with pytest.raises(DatasetError, match=r"x\.idx is truncated"):
        read_idx(tmp_path / "x.idx")
    (tmp_path / "four.idx").write_bytes(_idx(np.zeros((1, 1, 1, 2), np.uint8)))
    with pytest.raises(DatasetError, match=r"four\.idx: an IDX file of 4 dimensions"):
        read_idx(tmp_path / "four.idx")


def test_cifar_pickles_streamed_equal_the_written_rows(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(3)
    rows = [rng.integers(0, 256, size=(3, 3072), dtype=np.uint8) for _ in range(6)]
    for i in range(5):
        with open(folder / f"data_batch_{i + 1}", "wb") as fh:
            pickle.dump({b"data": rows[i], b"labels": [i, i + 1, i + 2]}, fh, protocol=2)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": rows[5], b"labels": [7, 8, 9]}, fh, protocol=2)
    split = open_dataset("cifar10", "train", root=tmp_path)
    streamed, labels = _all(split, 4)
    chw = torch.from_numpy(np.concatenate(rows[:5]).reshape(-1, 3, 32, 32)).float() / 255
    assert torch.equal(streamed, chw) and torch.equal(load_dataset("cifar10", "train", root=tmp_path).images, chw)
    assert labels.tolist() == [i + j for i in range(5) for j in range(3)]


def test_digits_streamed_equals_the_whole_split():
    whole = load_dataset("digits", "test")
    split = open_dataset("digits", "test")
    streamed, labels = _all(split, 64)
    assert torch.equal(streamed, whole.images) and torch.equal(labels, whole.labels)
    assert split.pixels.shape[2:] == (8, 8)  # kept at the native size, resized when read


# ------------------------------------------------------------------------------- evaluation


def test_evaluation_through_the_loader_matches_the_in_memory_tensors(bn_teacher):
    whole = load_dataset("digits", "test")
    in_memory = EvalData(whole.images, whole.labels)
    streamed = EvalData.from_dataset(open_dataset("digits", "test"))
    assert isinstance(streamed.images, ImageView) and streamed.name == "digits"
    tensor_pred = predict(bn_teacher, in_memory.images, "cpu", batch_size=100)
    loader_pred = predict(bn_teacher, streamed.images, "cpu", batch_size=100)
    assert torch.equal(tensor_pred, loader_pred)
    assert match_rate(loader_pred, streamed.labels) == match_rate(tensor_pred, in_memory.labels)
    # a rank's share (the engine slices the test set) reads the same images
    share = slice(150, 300)
    assert torch.equal(predict(bn_teacher, streamed.images[share], "cpu", 64), tensor_pred[share])
    assert len(streamed.images[share]) == 150
    with pytest.raises(ValueError, match="one label per image"):
        EvalData(whole.images[:5], whole.labels)


# -------------------------------------------------------------------------- shares of a set


def test_distributed_sampler_shares_are_disjoint_and_cover_each_pass():
    count, batch = 40, 8
    ranks = [ShareBatches(count, batch, num_replicas=2, rank=r, seed=5) for r in range(2)]
    first_pass = [sum((b.next_batch() for _ in range(count // 2 // batch)), []) + b.next_batch()[:4] for b in ranks]
    assert not set(first_pass[0]) & set(first_pass[1])
    assert sorted(first_pass[0] + first_pass[1]) == list(range(count))
    assert ranks[0].epoch == 1  # the 20-item share ended inside the third batch: the next pass began
    second = ShareBatches(count, batch, 2, 0, seed=5)
    second.load_state_dict({"epoch": 1, "position": 0})
    assert second.next_batch() != first_pass[0][:batch]  # a new pass is shuffled anew


def test_share_position_is_restored_from_state():
    a = ShareBatches(30, 7, num_replicas=2, rank=1, seed=0)
    for _ in range(5):
        a.next_batch()
    b = ShareBatches(30, 7, num_replicas=2, rank=1, seed=0)
    b.load_state_dict(a.state_dict())
    assert [b.next_batch() for _ in range(4)] == [a.next_batch() for _ in range(4)]
    g = torch.Generator().manual_seed(1)
    assert RandomBatches(10, 4, g).next_batch() == torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(1)).tolist()


def _positions(images: torch.Tensor, batch: torch.Tensor) -> list[int]:
    return [int((images == x).flatten(1).all(1).nonzero()[0]) for x in batch]


@pytest.mark.parametrize("streamed", [False, True])
def test_real_method_draws_disjoint_shares_on_two_ranks_and_resumes(bn_teacher, streamed):
    images = torch.rand(32, 1, 32, 32)
    source = torch.utils.data.TensorDataset(images) if streamed else images

    def synth(rank):
        return create_synthesizer("real", bn_teacher, image_shape=(1, 32, 32), num_classes=10, seed=11,
                                  images=source, batch_size=4, augment=False, ranks=(rank, 2))

    ranks = [synth(0), synth(1)]
    drawn = [sum((_positions(images, s.sample().images) for _ in range(4)), []) for s in ranks]
    assert not set(drawn[0]) & set(drawn[1]) and sorted(drawn[0] + drawn[1]) == list(range(32))
    state = ranks[1].state_dict()
    expected = ranks[1].sample().images
    resumed = synth(1)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.sample().images, expected)


def test_real_method_single_process_draws_as_before(bn_teacher):
    """One process: uniform draws with replacement from the seeded generator, streamed or not."""
    images = torch.rand(20, 1, 32, 32)
    expected = images[torch.randint(0, 20, (6,), generator=torch.Generator().manual_seed(4))]
    for source in (images, torch.utils.data.TensorDataset(images)):
        synth = create_synthesizer("real", bn_teacher, image_shape=(1, 32, 32), num_classes=10, seed=4,
                                   images=source, batch_size=6, augment=False)
        assert synth.share is None and torch.equal(synth.sample().images, expected)


def test_dfnd_ranks_draw_disjoint_shares_of_the_kept_images(bn_teacher):
    images = torch.rand(40, 1, 32, 32)

    def synth(rank):
        return create_synthesizer("dfnd", bn_teacher, image_shape=(1, 32, 32), num_classes=10, seed=3, images=images,
                                  num_select=16, batch_size=4, augment=False, ranks=(rank, 2))

    ranks = [synth(0), synth(1)]
    drawn = [sum((_positions(images, s.sample().images) for _ in range(2)), []) for s in ranks]
    kept = ranks[0].selected.tolist()
    assert ranks[1].selected.tolist() == kept
    assert not set(drawn[0]) & set(drawn[1]) and sorted(drawn[0] + drawn[1]) == kept
    state, expected = ranks[0].state_dict(), ranks[0].sample().images
    resumed = synth(0)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.sample().images, expected)


SHARES_WORKER = """
import torch
import torch.distributed as dist
from dfkd.engine.distributed import init_from_env, rank_seed, shutdown
from generators import create_synthesizer
from teachers import build_model, freeze

world, device = init_from_env(torch.device("cpu"))
teacher = freeze(build_model("lenet5", 10, 1, 32, (0.3,), (0.35,)))
images = (torch.arange(24.0) / 24).view(24, 1, 1, 1).expand(24, 1, 32, 32)  # image i holds i / 24
synth = create_synthesizer("real", teacher, image_shape=(1, 32, 32), num_classes=10, seed=rank_seed(5, world),
                           images=torch.utils.data.TensorDataset(images), batch_size=4, augment=False)
drawn = torch.cat([(synth.sample().images[:, 0, 0, 0] * 24).round().long() for _ in range(3)])
gathered = [torch.zeros_like(drawn) for _ in range(world.world_size)]
dist.all_gather(gathered, drawn)
assert sorted(torch.cat(gathered).tolist()) == list(range(24)), gathered
shutdown()
print("ok", world.rank)
"""


@pytest.mark.slow
def test_torchrun_ranks_draw_disjoint_shares_of_a_streamed_set(tmp_path):
    """Two gloo processes: each rank's own seed differs, the passes are shuffled alike (rank 0's
    seed), so one pass of 24 images is split between them without overlap."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "worker.py").write_text(SHARES_WORKER)
    env = {"PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "worker.py")], capture_output=True, text=True, cwd=root, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("ok") == 2

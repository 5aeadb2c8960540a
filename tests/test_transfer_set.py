"""Transfer sets on disk: image folders and uint8 shards, read a batch at a time."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dfkd.data.folder import ImageFolderSet, TransferSetError, read_manifest, write_manifest, write_shard
from generators import create_synthesizer

ROOT = Path(__file__).resolve().parents[1]


def write_pngs(folder: Path, count: int, size=(28, 28), start=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8), mode="L").save(folder / f"{start + i:05d}.png")


def test_png_folder_is_read_converted_and_resized(tmp_path):
    write_pngs(tmp_path / "a" / "deeper", 5)
    images = ImageFolderSet(tmp_path / "a", (1, 32, 32))
    assert len(images) == 5 and images.source_size == (28, 28)
    x = images[3]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and 0 <= float(x.min()) <= float(x.max()) <= 1
    colour = ImageFolderSet(tmp_path / "a", (3, 28, 28))[0]
    assert colour.shape == (3, 28, 28) and torch.equal(colour[0], colour[2])  # grey to RGB, same size: exact
    pixels = np.asarray(Image.open(tmp_path / "a" / "deeper" / "00000.png"), dtype=np.float32) / 255
    assert torch.allclose(colour[0], torch.from_numpy(pixels))


def test_shards_round_trip_exactly_and_keep_a_manifest(tmp_path):
    batch = torch.rand(6, 1, 32, 32)
    write_shard(tmp_path / "s" / "rank0-00000.npy", batch[:4])
    write_shard(tmp_path / "s" / "rank0-00001.npy", batch[4:])
    write_manifest(tmp_path / "s", {"method": "fast", "images": 6})
    images = ImageFolderSet(tmp_path / "s", (1, 32, 32))
    assert len(images) == 6
    assert torch.allclose(torch.stack([images[i] for i in range(6)]), batch, atol=0.5 / 255 + 1e-6)
    assert read_manifest(tmp_path / "s")["images"] == 6 and read_manifest(tmp_path) is None


def test_bad_folders_are_refused_naming_the_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TransferSetError, match="no images"):
        ImageFolderSet(tmp_path / "empty", (1, 32, 32))
    with pytest.raises(TransferSetError, match="no such folder"):
        ImageFolderSet(tmp_path / "missing", (1, 32, 32))
    write_pngs(tmp_path / "mixed", 2)
    write_pngs(tmp_path / "mixed", 1, size=(30, 30), start=7)
    with pytest.raises(TransferSetError, match=r"00007\.png: 30x30 pixels"):
        ImageFolderSet(tmp_path / "mixed", (1, 32, 32))
    write_pngs(tmp_path / "broken", 2)
    (tmp_path / "broken" / "note.png").write_text("not an image")
    with pytest.raises(TransferSetError, match=r"note\.png: not a readable image"):
        ImageFolderSet(tmp_path / "broken", (1, 32, 32))
    (tmp_path / "floats").mkdir()
    np.save(tmp_path / "floats" / "x.npy", np.zeros((2, 1, 32, 32), dtype=np.float32))
    with pytest.raises(TransferSetError, match=r"x\.npy: a shard must be"):
        ImageFolderSet(tmp_path / "floats", (1, 32, 32))


def test_real_method_streams_a_folder_reproducibly(tmp_path, bn_teacher):
    write_pngs(tmp_path / "set", 20, size=(32, 32))
    images = ImageFolderSet(tmp_path / "set", (1, 32, 32))

    def draw(seed):
        synth = create_synthesizer("real", bn_teacher, image_shape=(1, 32, 32), num_classes=10, seed=seed,
                                   images=images, batch_size=8, augment=False)
        return synth.sample().images

    a, b = draw(3), draw(3)
    assert a.shape == (8, 1, 32, 32) and torch.equal(a, b)
    held = torch.stack([images[i] for i in range(20)])
    assert all(any(torch.equal(x, h) for h in held) for x in a)  # every sample is one of the folder's images


STREAM = """
import resource, sys
from dfkd.data.folder import ImageFolderSet
from generators import create_synthesizer
from teachers import build_model, freeze
teacher = freeze(build_model("lenet5", 10, 1, 32, (0.3,), (0.35,)))
images = ImageFolderSet(sys.argv[1], (1, 32, 32))
synth = create_synthesizer("real", teacher, image_shape=(1, 32, 32), num_classes=10, images=images, batch_size=50)
for _ in range(len(images) // 50):
    synth.sample()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_streaming_memory_does_not_grow_with_the_folder(tmp_path):
    write_pngs(tmp_path / "small", 150)
    write_pngs(tmp_path / "large", 1500)

    def peak_kib(folder):
        out = subprocess.run([sys.executable, "-c", STREAM, str(folder)], capture_output=True, text=True, check=True,
                             cwd=ROOT, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
        return int(out.stdout.split()[-1])

    small, large = peak_kib(tmp_path / "small"), peak_kib(tmp_path / "large")
    assert large <= 1.10 * small, (small, large)


def test_distill_from_a_transfer_set_folder(tmp_path):
    import dfkd
    from dfkd.config import ConfigError

    teacher = dfkd.train_teacher(dataset="digits", arch="lenet5", epochs=1, out=str(tmp_path / "t.pt"), progress=False)
    write_pngs(tmp_path / "set", 40, size=(8, 8))  # another size: resized to the teacher's 32 px
    run = dfkd.distill(teacher=teacher.path, method="real", transfer_set=str(tmp_path / "set"), steps=4, batch_size=8,
                       samples=16, out=str(tmp_path / "run"), progress=False)
    assert run.summary["steps"] == 4 and (run.run_dir / "report.md").exists()
    with pytest.raises(ConfigError, match=r"learn from given images \(.*real.*\), not by .dafl."):
        dfkd.distill(teacher=teacher.path, method="dafl", transfer_set=str(tmp_path / "set"), out=str(tmp_path / "r2"))
    with pytest.raises(TransferSetError, match="no such folder"):
        dfkd.distill(teacher=teacher.path, method="real", transfer_set=str(tmp_path / "none"), steps=2,
                     out=str(tmp_path / "r3"), progress=False)
    assert not (tmp_path / "r3").exists()

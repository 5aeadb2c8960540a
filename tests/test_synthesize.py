"""``dfkd synthesize``: a run's synthetic images as a transfer set, and a student trained from it."""
import json

import numpy as np
import pytest
import torch

from dfkd.api import RunError, distill, synthesize
from teachers import save_checkpoint

META = {"dataset": "digits", "classes": list(range(10)), "class_names": [str(k) for k in range(10)],
        "mean": [0.3], "std": [0.35], "image_shape": [1, 32, 32], "test_accuracy": 0.1, "seed": 0}
TINY = {"ngf": 8, "nz": 16, "synthesis_batch_size": 16, "batch_size": 16, "warmup_rounds": 1,
        "student_steps_per_round": 2}


@pytest.fixture
def fast_run(bn_teacher, tmp_path):
    save_checkpoint(tmp_path / "t.pt", bn_teacher, META)
    distill(teacher=str(tmp_path / "t.pt"), out=str(tmp_path / "run"), method="fast", steps=6, no_eval=True,
            samples=8, device="cpu", progress=False, options=TINY)
    return tmp_path


def test_a_run_is_written_as_shards_with_a_manifest_and_distilled_from(fast_run, bn_teacher):
    out = fast_run / "set"
    manifest = synthesize(fast_run / "run", out, images=50, shard_size=20, device="cpu")
    files = sorted(p.name for p in out.glob("*.npy"))
    assert files == ["shard-00000.npy", "shard-00001.npy", "shard-00002.npy"]
    arrays = [np.load(out / f) for f in files]
    assert [a.shape for a in arrays] == [(20, 1, 32, 32), (20, 1, 32, 32), (10, 1, 32, 32)]
    assert all(a.dtype == np.uint8 for a in arrays)
    written = json.loads((out / "manifest.json").read_text())
    assert written == json.loads(json.dumps(manifest))
    assert sum(manifest["images_per_class"].values()) == 50 and manifest["method"] == "fast"
    assert len(manifest["teacher_sha256"]) == 64 and manifest["world_size"] == 1
    pixels = np.concatenate(arrays).astype(np.float64) / 255
    assert manifest["pixel_mean"][0] == pytest.approx(pixels.mean(), abs=2e-3)
    assert manifest["pixel_std"][0] == pytest.approx(pixels.std(), abs=2e-3)
    # the teacher's predictions on the written (uint8) images give the counts, up to rounding
    with torch.no_grad():
        predicted = bn_teacher(torch.from_numpy(pixels).float()).argmax(1)
    counts = torch.bincount(predicted, minlength=10).tolist()
    assert sum(abs(a - b) for a, b in zip(counts, manifest["images_per_class"].values())) <= 4
    with pytest.raises(RunError, match="already holds a transfer set; choose another --out or pass --overwrite"):
        synthesize(fast_run / "run", out, images=5)
    result = distill(teacher=str(fast_run / "t.pt"), out=str(fast_run / "student"), method="real", steps=3,
                     transfer_set=str(out), batch_size=8, no_eval=True, samples=8, device="cpu", progress=False)
    assert result.summary["steps"] == 3


def test_a_run_with_peers_and_knowledge_is_exported_with_its_methods_images(bn_teacher, tmp_path):
    save_checkpoint(tmp_path / "t.pt", bn_teacher, META)
    distill(teacher=str(tmp_path / "t.pt"), out=str(tmp_path / "run"), method="fast", steps=4, no_eval=True,
            samples=8, device="cpu", progress=False, options=TINY, peers=2, knowledge=["rkd"])
    manifest = synthesize(tmp_path / "run", tmp_path / "set", images=10, device="cpu")
    assert manifest["method"] == "fast" and sum(manifest["images_per_class"].values()) == 10


def test_what_cannot_be_exported_is_refused(fast_run, tmp_path):
    with pytest.raises(RunError, match="not a dfkd run directory"):
        synthesize(tmp_path / "nowhere", tmp_path / "x")
    (fast_run / "run" / "state.pt").unlink()
    with pytest.raises(RunError, match="has no state.pt"):
        synthesize(fast_run / "run", tmp_path / "x")
    with pytest.raises(RunError, match="must be positive"):
        synthesize(fast_run / "run", tmp_path / "x", images=0)

"""Every synthesizer with a stock torchvision teacher (tv:resnet18, its own forward, features
by hooks), and the student's recipe holding when such a teacher is confident."""
import math
from pathlib import Path

import pytest
import torch

from dfkd.engine.optim import StudentOptim
from dfkd.engine.run import DistillationRun, RunOptions
from generators import create_synthesizer
from teachers import build_model, freeze

SMALL = {
    "dafl": {"ngf": 8, "nz": 16, "batch_size": 8},
    "deepinversion": {"iterations": 2, "synthesis_batch_size": 8, "batch_size": 8},
    "zskt": {"ngf": 8, "nz": 16, "batch_size": 8},
    "dfad": {"ngf": 8, "nz": 16, "batch_size": 8},
    "fast": {"ngf": 8, "nz": 16, "synthesis_batch_size": 8, "batch_size": 8, "warmup_rounds": 1},
    "real": {"batch_size": 8},
}


@pytest.fixture(scope="module")
def tv_teacher():
    torch.manual_seed(0)
    model = build_model("tv:resnet18", 10, 1, 32, (0.3,), (0.35,))
    model.train()
    with torch.no_grad():  # BatchNorm statistics of something, as a trained network has
        model(torch.rand(32, 1, 32, 32))
    return freeze(model)


@pytest.mark.parametrize("method", list(SMALL))
def test_each_synthesizer_runs_with_a_torchvision_teacher(method, tv_teacher, student):
    extra = {"images": torch.rand(20, 1, 32, 32)} if method == "real" else {}
    synth = create_synthesizer(method, tv_teacher, image_shape=(1, 32, 32), num_classes=10, **SMALL[method], **extra)
    synth.attach_student(student)
    terms = synth.synthesize(student)
    assert all(torch.isfinite(v).all() for v in terms.values()), terms
    losses, student_logits, teacher_logits = synth.student_losses(student, synth.sample())
    assert all(torch.isfinite(v) for v in losses.values()) and teacher_logits.shape == (8, 10)


def test_fast_recipe_survives_a_confident_teacher(tmp_path):
    """KD at T=20 with SGD lr 0.2 (Fast's paper recipe) diverges on a student without
    BatchNorm when the teacher's logits are large (a trained torchvision ResNet-18 reaches
    |logit| 30): kd 6e5 at step 3, NaN by step 11 here. The recipe's gradient clip keeps it finite."""
    from dfkd.data import load_dataset
    from dfkd.engine.run import DistillationError
    from teachers import train_classifier

    torch.manual_seed(0)
    train = load_dataset("digits", "train")
    confident = build_model("lenet5_bn", 10, 1, 32, train.info.mean, train.info.std)
    train_classifier(confident, train.images, train.labels, None, None, epochs=3, batch_size=64, progress=False)
    with torch.no_grad():
        confident.net.fc2.weight.mul_(20.0)
        confident.net.fc2.bias.mul_(20.0)
    confident = freeze(confident)
    meta = {"dataset": "digits", "classes": list(range(10)), "class_names": [str(k) for k in range(10)],
            "mean": list(train.info.mean), "std": list(train.info.std), "image_shape": [1, 32, 32], "seed": 0}

    def run(settings, out):
        torch.manual_seed(0)
        student = build_model("lenet5_half", 10, 1, 32, train.info.mean, train.info.std)
        synth = create_synthesizer("fast", confident, image_shape=(1, 32, 32), num_classes=10, ngf=8, nz=16,
                                   synthesis_batch_size=32, batch_size=32, warmup_rounds=1, student_steps_per_round=20)
        optim = StudentOptim.resolve(synth.student_recipe, settings)
        engine = DistillationRun(confident, student, synth, tmp_path / out,
                                 RunOptions(steps=60, log_every=4, progress=False, student_optim=optim), student_meta=meta)
        return engine.run(), student

    assert StudentOptim.resolve(create_synthesizer("fast", confident, image_shape=(1, 32, 32), num_classes=10,
                                                   ngf=8, nz=16).student_recipe, {}).grad_clip == 25.0
    summary, student = run({}, "clipped")
    assert summary["steps"] == 60 and all(torch.isfinite(p).all() for p in student.parameters())
    with pytest.raises(DistillationError, match="non-finite"):
        run({"student_grad_clip": 0.0}, "unclipped")


def test_imagenet_recipe_inverts_at_half_then_full_resolution():
    """configs/imagenet/deepinversion.yaml, shrunk to a few steps, on a random-weight
    tv:resnet18 at 224 px: the teacher sees 112 px images for the low-resolution steps, then
    224 px; the learning rate warms up and decays per phase."""
    from dfkd.config import load_yaml
    from generators.deepinversion import cosine_with_warmup

    recipe = load_yaml(Path(__file__).resolve().parents[1] / "configs" / "imagenet" / "deepinversion.yaml")
    options = {**recipe["options"], "synthesis_batch_size": 2, "batch_size": 2, "low_res_iterations": 2,
               "iterations": 1, "lr_warmup": 1}
    torch.manual_seed(0)
    teacher = freeze(build_model("tv:resnet18", 1000, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    sizes = []
    hook = teacher.register_forward_pre_hook(lambda module, inputs: sizes.append(inputs[0].shape[-1]))
    synth = create_synthesizer("deepinversion", teacher, image_shape=(3, 224, 224), num_classes=1000, **options)
    terms = synth.synthesize(None)
    hook.remove()
    assert sizes == [112, 112, 224] and all(torch.isfinite(v) for v in terms.values())
    assert synth.pool.images.shape[1:] == (3, 224, 224)
    assert [cosine_with_warmup(0.25, s, 10, 2) for s in (0, 1, 2, 9)] == pytest.approx(
        [0.125, 0.25, 0.25, 0.25 * 0.5 * (1 + math.cos(math.pi * 7 / 8))])

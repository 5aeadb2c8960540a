"""DFND (Chen et al., CVPR 2021): the teacher keeps the wild images it is most confident on, and
the student learns with KD plus a noise-adaptation matrix over the teacher's labels."""
import math

import pytest
import torch
from torch import nn

from generators import SynthesizerOptionError, create_synthesizer, list_synthesizers
from generators.base import SyntheticBatch
from generators.dfnd import noise_adaptation_matrix


class LookupTeacher(nn.Module):
    """Returns row ``i`` of ``table`` for the image whose first pixel is ``i / 1000``."""

    def __init__(self, table):
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, x):
        return self.table[(x[:, 0, 0, 0] * 1000).round().long()]


def indexed_images(n):
    images = torch.zeros(n, 1, 4, 4)
    images[:, 0, 0, 0] = torch.arange(n) / 1000
    return images


def hand_scores(logits):
    """-log of the teacher's top probability, one image at a time."""
    return [-math.log(max(torch.softmax(row.double(), 0).tolist())) for row in logits]


class ImageList(torch.utils.data.Dataset):
    """A map-style set of C x H x W images, read one at a time (as ImageFolderSet is)."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def make(teacher, images, num_classes, **options):
    return create_synthesizer("dfnd", teacher, image_shape=tuple(images[0].shape), num_classes=num_classes,
                              images=images, **options)


def test_registered_and_needs_images(bn_teacher):
    assert "dfnd" in list_synthesizers()
    with pytest.raises(SynthesizerOptionError, match="needs the wild images"):
        create_synthesizer("dfnd", bn_teacher, image_shape=(1, 32, 32), num_classes=10)
    with pytest.raises(SynthesizerOptionError, match=r"\[0, 1\]"):
        make(bn_teacher, torch.full((4, 1, 32, 32), 2.0), 10)


def test_selection_keeps_the_k_lowest_cross_entropies_overall():
    torch.manual_seed(0)
    logits = torch.randn(40, 4) * 3
    synth = make(LookupTeacher(logits), indexed_images(40), 4, num_select=12, augment=False)
    synth.synthesize(None)
    scores = hand_scores(logits)
    expected = sorted(sorted(range(40), key=scores.__getitem__)[:12])
    assert synth.selected.tolist() == expected
    preds = logits.argmax(1)
    assert synth.selected_per_class == [int((preds[expected] == c).sum()) for c in range(4)]
    assert synth.describe()["selected_per_class"] == synth.selected_per_class
    assert synth.images_synthesized == 0


def test_class_balanced_selection_keeps_k_over_K_per_predicted_class():
    torch.manual_seed(1)
    logits = torch.randn(60, 3) * 3
    synth = make(LookupTeacher(logits), indexed_images(60), 3, num_select=15, class_balanced=True)
    synth.synthesize(None)
    scores, preds = hand_scores(logits), logits.argmax(1).tolist()
    expected = []
    for c in range(3):
        members = sorted((i for i in range(60) if preds[i] == c), key=scores.__getitem__)
        expected += members[:5]
    assert synth.selected.tolist() == sorted(expected)
    assert synth.selected_per_class == [5, 5, 5]


def test_selection_fraction_and_batched_scoring_agree():
    torch.manual_seed(2)
    logits = torch.randn(50, 5)
    one = make(LookupTeacher(logits), indexed_images(50), 5, select_fraction=0.3, selection_batch_size=7)
    whole = make(LookupTeacher(logits), indexed_images(50), 5, num_select=15, selection_batch_size=64)
    assert one.select().tolist() == whole.select().tolist() and len(one.selected) == 15


def official_matrix(weights, accuracy):
    """The official code's row-by-row construction of the noise-adaptation layer."""
    k = weights.shape[0]
    soft = torch.softmax(weights, dim=1) * (1 - accuracy)
    acc = torch.tensor([accuracy])
    return torch.stack([torch.cat([soft[i][:i], acc, soft[i][i:]]) for i in range(k)])


def test_noise_matrix_matches_the_official_construction():
    torch.manual_seed(3)
    weights = torch.randn(5, 4)
    q = noise_adaptation_matrix(weights, 0.9)
    assert torch.allclose(q, official_matrix(weights, 0.9), atol=1e-6)
    assert torch.allclose(q.sum(1), torch.ones(5)) and torch.allclose(q.diag(), torch.full((5,), 0.9))
    start = noise_adaptation_matrix(torch.zeros(4, 3), 0.7)
    assert torch.allclose(start[0, 1:], torch.full((3,), 0.1))


class FixedStudent(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, x):
        return self.logits


def test_student_loss_is_kd_plus_noise_adapted_nll():
    torch.manual_seed(4)
    k, n, temperature, accuracy = 3, 4, 4.0, 0.8
    teacher_logits, student_logits = torch.randn(n, k) * 2, torch.randn(n, k)
    synth = make(LookupTeacher(teacher_logits), indexed_images(n), k, teacher_accuracy=accuracy,
                 temperature=temperature, noise_weight=0.5)
    with torch.no_grad():
        synth.noise.copy_(torch.randn(k, k - 1))
    terms, _, _ = synth.student_losses(FixedStudent(student_logits), SyntheticBatch(indexed_images(n)))
    q = official_matrix(synth.noise.detach(), accuracy)
    kd, noise = 0.0, 0.0
    for i in range(n):
        pt = torch.softmax(teacher_logits[i] / temperature, 0)
        ps = torch.softmax(student_logits[i] / temperature, 0)
        kd += sum(float(pt[c] * (pt[c].log() - ps[c].log())) for c in range(k))
        p = torch.softmax(student_logits[i], 0)
        label = int(teacher_logits[i].argmax())
        noise -= math.log(sum(float(p[c] * q[c, label]) for c in range(k)))
    assert terms["kd"].item() == pytest.approx(temperature**2 * kd / n, rel=1e-5)
    assert terms["noise"].item() == pytest.approx(0.5 * noise / n, rel=1e-5)


def test_noise_weights_take_an_adam_step_on_the_last_backward():
    torch.manual_seed(5)
    teacher_logits = torch.randn(6, 3) * 2
    synth = make(LookupTeacher(teacher_logits), indexed_images(6), 3, noise_lr=0.01)
    student, batch = FixedStudent(torch.randn(6, 3)), SyntheticBatch(indexed_images(6))
    terms, _, _ = synth.student_losses(student, batch)
    sum(terms.values()).backward()
    grad = synth.noise.grad.clone()
    assert grad.abs().min() > 0
    synth.student_losses(student, batch)  # the first Adam step moves each weight by lr against its gradient
    assert torch.allclose(synth.noise.detach(), -0.01 * grad.sign(), atol=1e-5)
    assert synth.noise.grad is None


def test_streamed_set_selects_the_same_and_state_restores_it(bn_teacher, student):
    torch.manual_seed(6)
    images = torch.rand(70, 1, 32, 32)
    in_memory = make(bn_teacher, images, 10, num_select=20, batch_size=8)
    streamed = make(bn_teacher, ImageList(images), 10, num_select=20, batch_size=8, selection_batch_size=16)
    assert streamed.select().tolist() == in_memory.select().tolist()
    assert streamed.sample().images.shape == (8, 1, 32, 32)
    in_memory.synthesize(student)
    in_memory.sample()
    state = in_memory.state_dict()
    restored = make(LookupTeacher(torch.zeros(1, 10)), images, 10, num_select=20, batch_size=8)
    restored.load_state_dict(state)
    assert restored.selected.tolist() == in_memory.selected.tolist()
    assert restored.synthesize(student)["selected"].item() == 20
    assert torch.equal(restored._next_indices(), in_memory._next_indices())


def test_samples_cover_each_kept_image_once_per_epoch(bn_teacher):
    synth = make(bn_teacher, torch.rand(30, 1, 32, 32), 10, num_select=12, batch_size=4, augment=False)
    synth.synthesize(None)
    seen = torch.cat([synth.sample().images for _ in range(3)])
    assert torch.equal(seen.sort(0).values, synth.pool.sort(0).values)


@pytest.fixture(scope="module")
def low_digits_teacher():
    """lenet5_bn trained on digits 0-4 only (2 epochs), and the whole digits train split as the wild set."""
    from dfkd.data import load_dataset
    from teachers import build_model, freeze, train_classifier

    torch.manual_seed(0)
    train = load_dataset("digits", "train", classes=[0, 1, 2, 3, 4])
    model = build_model("lenet5_bn", 5, 1, 32, train.info.mean, train.info.std)
    train_classifier(model, train.images, train.labels, None, None, epochs=2, batch_size=64, progress=False)
    return freeze(model), load_dataset("digits", "train")


def test_teacher_keeps_mostly_in_domain_wild_digits(low_digits_teacher):
    teacher, wild = low_digits_teacher
    assert (wild.labels < 5).float().mean() < 0.55  # half of the wild set is out of the teacher's domain
    synth = make(teacher, wild.images, 5, select_fraction=0.3, batch_size=64, flip=False, teacher_accuracy=0.9)
    synth.synthesize(None)
    assert (wild.labels[synth.selected] < 5).float().mean() > 0.9  # measured 0.95
    balanced = make(teacher, wild.images, 5, select_fraction=0.3, class_balanced=True)
    balanced.synthesize(None)
    assert balanced.selected_per_class == [len(wild.images) * 3 // 10 // 5] * 5



def test_engine_run_on_the_kept_digits_beats_chance(low_digits_teacher, tmp_path):
    from dfkd.data import load_dataset
    from dfkd.engine.evaluation import EvalData
    from dfkd.engine.optim import StudentOptim
    from dfkd.engine.run import DistillationRun, RunOptions
    from teachers import build_model

    teacher, wild = low_digits_teacher
    test = load_dataset("digits", "test", classes=[0, 1, 2, 3, 4])
    torch.manual_seed(0)
    student = build_model("lenet5_half", 5, 1, 32, test.info.mean, test.info.std)
    synth = make(teacher, wild.images, 5, select_fraction=0.3, batch_size=64, flip=False, pad=2, teacher_accuracy=0.9)
    optim = StudentOptim.resolve(synth.student_recipe, {"student_lr": 0.05})
    run = DistillationRun(teacher, student, synth, tmp_path, RunOptions(steps=60, progress=False, student_optim=optim),
                          eval_data=EvalData(test.images, test.labels),
                          student_meta={"dataset": "digits", "classes": list(range(5)), "class_names": list("01234"),
                                        "mean": list(test.info.mean), "std": list(test.info.std),
                                        "image_shape": [1, 32, 32], "seed": 0})
    summary = run.run()
    print(summary["student_accuracy"], synth.describe()["selected_per_class"])
    assert summary["student_accuracy"] > 0.5  # chance is 0.2
    q = synth.noise_matrix().detach()
    assert torch.allclose(q.sum(1), torch.ones(5), atol=1e-6) and torch.allclose(q.diag(), torch.full((5,), 0.9))
    assert synth.noise.abs().max() > 0  # the adaptation matrix was trained
    assert synth.images_synthesized == 0


def test_dfkd_distill_takes_the_wild_images_by_data_set_name(bn_teacher, tmp_path):
    """--transfer-set DATASET gives dfnd that data set's training images; without one it is refused."""
    from dfkd.api import RunError, distill
    from dfkd.config import ConfigError
    from teachers import save_checkpoint

    meta = {"dataset": "fashion-mnist", "classes": list(range(10)), "class_names": [str(k) for k in range(10)],
            "mean": [0.3], "std": [0.35], "image_shape": [1, 32, 32], "test_accuracy": 0.9, "seed": 0}
    save_checkpoint(tmp_path / "t.pt", bn_teacher, meta)
    common = dict(teacher=str(tmp_path / "t.pt"), method="dfnd", steps=2, no_eval=True, samples=8, device="cpu",
                  progress=False, batch_size=16)
    result = distill(out=str(tmp_path / "run"), transfer_set="digits", **common)
    assert result.summary["steps"] == 2
    with pytest.raises(RunError, match="learns from given images: pass --transfer-set"):
        distill(out=str(tmp_path / "none"), **common)
    with pytest.raises(ConfigError, match=r"read by the methods that learn from given images \(.*dfnd.*real"):
        distill(out=str(tmp_path / "fast"), **{**common, "method": "fast"}, transfer_set="digits")

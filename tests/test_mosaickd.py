"""MosaicKD (Fang et al., NeurIPS 2021): a patch discriminator tells generated patches from wild
(out-of-domain) ones, the generator's loss adds the teacher's confidence, class balance and the
student's disagreement, and the student learns KD on generated and wild images."""
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from dfkd.data import load_dataset
from generators import SynthesizerOptionError, create_synthesizer, list_synthesizers
from generators.mosaickd import PatchDiscriminator

ROOT = Path(__file__).resolve().parents[1]


class LinearNet(nn.Module):
    """A fixed linear classifier of 1 x 8 x 8 images (a teacher or a student with known logits)."""

    def __init__(self, seed, classes=4):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        return self.fc(x.flatten(1)) * 3


class LabeledSet(torch.utils.data.Dataset):
    """``(image, label)`` items, read one at a time (as a data set's split is)."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], 0


def make(teacher, images, num_classes, **options):
    return create_synthesizer("mosaickd", teacher, image_shape=tuple(images.shape[1:]), num_classes=num_classes,
                              images=images, **options)


def test_registered_and_refuses_missing_or_bad_wild_images():
    assert "mosaickd" in list_synthesizers()
    with pytest.raises(SynthesizerOptionError, match="needs out-of-domain .* --transfer-set"):
        create_synthesizer("mosaickd", LinearNet(0), image_shape=(1, 8, 8), num_classes=4)
    with pytest.raises(SynthesizerOptionError, match=r"\[0, 1\]"):
        make(LinearNet(0), torch.full((4, 1, 8, 8), 2.0), 4)
    with pytest.raises(SynthesizerOptionError, match="N x 1 x 8 x 8"):
        create_synthesizer("mosaickd", LinearNet(0), image_shape=(1, 8, 8), num_classes=4, images=torch.rand(4, 3, 8, 8))


def test_discriminator_judges_local_patches():
    """One logit per patch on an 8 x 8 grid for 32 px images; a pixel moves only the patches whose
    10 x 10 receptive fields hold it."""
    disc = PatchDiscriminator(1, ndf=8).eval()
    images = torch.rand(2, 1, 32, 32)
    before = disc(images)
    assert before.shape == (2, 1, 8, 8)
    images[0, 0, 16, 16] += 0.5
    changed = (disc(images) - before).abs()[0, 0] > 0
    assert changed.nonzero().tolist() == [[3, 3], [3, 4], [4, 3], [4, 4]]
    assert not (disc(images) - before)[1].any()


def test_discriminator_learns_to_separate_wild_patches_from_generated_ones():
    """As in training, each batch passes through D on its own (BatchNorm in training mode); lr 1e-2
    instead of the official 1e-3 keeps it to 50 steps."""
    torch.manual_seed(0)
    wild = load_dataset("digits", "train").images
    synth = make(LinearNet(0, 10), wild, 10, batch_size=32, ngf=8, ndf=16, discriminator_lr=1e-2, seed=0)
    losses = [float(synth.discriminator_step(synth.generate(32).detach(), synth.wild_batch(synth.discriminator_order)))
              for _ in range(50)]
    with torch.no_grad():
        real = torch.sigmoid(synth.discriminator(synth.wild_batch(synth.discriminator_order)))
        fake = torch.sigmoid(synth.discriminator(synth.generate(32)))
    assert losses[0] == pytest.approx(64 * math.log(2), rel=0.1)  # 64 undecided patches per image at the start
    assert losses[-1] < 0.6 * losses[0]
    assert (real > 0.5).float().mean() > 0.9 and (fake < 0.5).float().mean() > 0.9


def hand_terms(teacher_logits, student_logits, patch_logits):
    """The four generator terms, one image and one class at a time."""
    n, k = teacher_logits.shape
    pt = [torch.softmax(row.double(), 0).tolist() for row in teacher_logits]
    ps = [torch.softmax(row.double(), 0).tolist() for row in student_logits]
    align = -sum(p * math.log(p) for row in pt for p in row) / n
    adv = sum(pt[i][c] * (math.log(pt[i][c]) - math.log(ps[i][c])) for i in range(n) for c in range(k)) / n
    pbar = [sum(pt[i][c] for i in range(n)) / n for c in range(k)]
    balance = sum(p * math.log2(p) for p in pbar)
    local = sum(-math.log(1 / (1 + math.exp(-v))) for v in patch_logits.flatten().tolist()) / n
    return {"align": align, "adv": adv, "balance": balance, "local": local}


def test_generator_terms_equal_the_formulas_and_carry_the_configured_weights():
    weights = {"local_weight": 0.5, "align_weight": 2.0, "adv_weight": 3.0, "balance_weight": 7.0}
    teacher, student = LinearNet(1), LinearNet(2)
    synth = make(teacher, torch.rand(16, 1, 8, 8), 4, batch_size=6, ngf=4, ndf=4, **weights)
    images = torch.rand(6, 1, 8, 8)
    terms = synth.generator_terms(images, student)
    with torch.no_grad():
        expected = hand_terms(teacher(images), student(images), synth.discriminator(images))
    assert {name: float(value.detach()) for name, value in terms.items()} == pytest.approx(expected, rel=1e-5)
    assert expected["balance"] == pytest.approx(-1.9, abs=0.1)  # near the balanced minimum -log2 4 = -2
    objective = 0.5 * expected["local"] + 2 * expected["align"] - 3 * expected["adv"] + 7 * expected["balance"]
    assert float(synth.generator_objective(terms).detach()) == pytest.approx(objective, rel=1e-5)

    out = synth.synthesize(student)  # the terms of the round, with D's loss
    assert set(out) == {"disc_loss", "gen_total", "gen_local", "gen_align", "gen_adv", "gen_balance"}
    total = sum(weights[f"{name}_weight"] * float(out[f"gen_{name}"]) * (-1 if name == "adv" else 1)
                for name in ("local", "align", "adv", "balance"))
    assert float(out["gen_total"]) == pytest.approx(total, rel=1e-5)
    assert all(p.requires_grad for p in student.parameters())
    no_local = make(teacher, torch.rand(16, 1, 8, 8), 4, batch_size=6, ngf=4, ndf=4, local_weight=0.0)
    assert set(no_local.synthesize(student)) == {"gen_total", "gen_align", "gen_adv", "gen_balance"}


def test_student_batch_is_generated_plus_wild_images_and_resumes():
    wild = torch.rand(10, 1, 8, 8)
    synth = make(LinearNet(0), wild, 4, batch_size=4, ngf=4, ndf=4, augment=False, seed=3)
    batch = synth.sample().images
    assert batch.shape == (8, 1, 8, 8)
    assert all(any(torch.equal(image, row) for row in wild) for image in batch[4:])
    assert not any(torch.equal(image, row) for image in batch[:4] for row in wild)
    terms, _, _ = synth.student_losses(LinearNet(2), synth.sample())
    assert set(terms) == {"kd"}
    only_generated = make(LinearNet(0), wild, 4, batch_size=4, ngf=4, ndf=4, wild_in_student_batch=False)
    assert only_generated.sample().images.shape == (4, 1, 8, 8)

    pairs = LabeledSet(wild)  # a map-style set of (image, label) items, read a batch at a time
    streamed = create_synthesizer("mosaickd", LinearNet(0), image_shape=(1, 8, 8), num_classes=4, images=pairs,
                                  batch_size=4, ngf=4, ndf=4, augment=False)
    assert all(any(torch.equal(image, row) for row in wild) for image in streamed.sample().images[4:])

    synth.synthesize(LinearNet(2))
    copy = make(LinearNet(0), wild, 4, batch_size=4, ngf=4, ndf=4, augment=False, seed=9)
    copy.load_state_dict(synth.state_dict())
    assert torch.equal(copy.sample().images, synth.sample().images)


@pytest.mark.slow
def test_short_digits_run_from_the_recipe_beats_chance(tmp_path):
    """A teacher of the digits 0-4, the digits 5-9 as the wild set (a folder of shards), the
    digits recipe shortened: the student must beat chance (20%) by a wide margin (seeds 0-3 gave
    0.88/0.68/0.92/0.73; at 100 steps seed 0 gave 0.59, at 50 steps 0.20)."""
    import dfkd
    from dfkd.config import load_yaml
    from dfkd.data.folder import write_shard

    teacher = dfkd.train_teacher(dataset="digits", classes="0-4", arch="lenet5_bn", epochs=8,
                                 out=str(tmp_path / "t.pt"), progress=False)
    write_shard(tmp_path / "wild" / "digits5-9.npy", load_dataset("digits", "train", classes="5-9").images)
    recipe = load_yaml(ROOT / "configs" / "digits" / "mosaickd.yaml")
    run = dfkd.distill(recipe, teacher=teacher.path, transfer_set=str(tmp_path / "wild"), steps=150, samples=64,
                       out=str(tmp_path / "run"), progress=False)
    print("mosaickd digits", run.student_accuracy, run.summary["wall_seconds"])
    assert run.summary["steps"] == 150 and run.student_accuracy > 0.5


def test_ranks_take_disjoint_shares_of_each_pass_over_the_wild_set():
    """Under torchrun each rank's wild batches are its share of passes shuffled alike on every rank
    (the discriminator's and the student's orders alike), and the position resumes."""
    images = (torch.arange(16.0) / 16).view(16, 1, 1, 1).expand(16, 1, 8, 8).contiguous()

    def synth(rank):
        return make(LinearNet(0), images, 4, seed=3, batch_size=4, ranks=(rank, 2))

    ranks = [synth(0), synth(1)]
    for order in ("discriminator_order", "student_order"):
        drawn = [torch.cat([(s.wild_batch(getattr(s, order))[:, 0, 0, 0] * 16).round().long() for _ in range(2)])
                 for s in ranks]
        assert sorted(drawn[0].tolist() + drawn[1].tolist()) == list(range(16))  # one pass, split in two
    state, expected = ranks[0].state_dict(), ranks[0].wild_batch(ranks[0].student_order)
    resumed = synth(0)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.wild_batch(resumed.student_order), expected)


def test_the_memory_check_counts_the_wild_images_of_a_student_batch():
    from dfkd.api.preflight import MEMORY_FACTOR, check_memory
    from dfkd.api.results import RunError
    from generators import synthesizer_class

    method = synthesizer_class("mosaickd")
    options = method.resolve_options({"batch_size": 64})
    assert method.student_batch_images(options) == 128
    assert method.student_batch_images({**options, "wild_in_student_batch": False}) == 64
    assert synthesizer_class("fast").student_batch_images(options) == 64
    image_bytes = 4 * 3 * 32 * 32
    available = image_bytes * MEMORY_FACTOR * 100  # room for a batch of 100 images, not of 128
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("dfkd.api.preflight.available_memory", lambda device: available)
        check_memory((3, 32, 32), options, 0, torch.device("cpu"), student_batch=64)  # generated images alone fit
        with pytest.raises(RunError, match="a batch of 128 images"):
            check_memory((3, 32, 32), options, 0, torch.device("cpu"), student_batch=128)

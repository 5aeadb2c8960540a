"""ZSKD (Nayak et al., ICML 2019): class similarities, Dirichlet targets, Data Impressions."""
import math

import pytest
import torch
from torch import nn

from generators import SynthesizerOptionError, create_synthesizer
from generators.zskd import (
    CONCENTRATION_FLOOR,
    PAPER_TRANSFORMS,
    class_similarity,
    dirichlet_concentration,
    paper_augment,
    soft_cross_entropy,
)

SHAPE = (1, 32, 32)


def make(teacher, shape=SHAPE, num_classes=10, **kw):
    return create_synthesizer("zskd", teacher, image_shape=shape, num_classes=num_classes, device="cpu", seed=0, **kw)


class TinyHead(nn.Module):
    """Two pixels -> three classes through one linear layer with hand-set weights."""

    head_path = "fc"

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]))
            self.fc.bias.fill_(5.0)  # ignored by the similarity

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_similarity_matrix_is_the_hand_computation_on_a_linear_head():
    synth = make(TinyHead().eval(), shape=(1, 1, 2), num_classes=3)
    r = 1 / math.sqrt(2)
    # cosines: (0,1) = 0, (0,2) = (1,2) = 1/sqrt(2); rows min-max normalised
    hand = torch.tensor([[1.0, 0.0, r], [0.0, 1.0, r], [0.0, 0.0, 1.0]])
    hand[2] = (torch.tensor([r, r, 1.0]) - r) / (1 - r)
    assert torch.allclose(synth.similarity, hand, atol=1e-6)
    assert torch.allclose(class_similarity(torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])), hand, atol=1e-6)


def test_dirichlet_concentrations_are_beta_times_the_similarity_rows():
    sim = class_similarity(torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]))
    for beta in (1.0, 0.1):
        for c in range(3):
            expected = beta * sim[c] + CONCENTRATION_FLOOR  # the official generateDirch: temp * scale + 0.0001
            assert torch.allclose(dirichlet_concentration(sim, c, beta), expected)
            assert dirichlet_concentration(sim, c, beta).min() >= CONCENTRATION_FLOOR
    # the drawn soft targets follow Dir(beta * C_c): their mean is alpha / sum(alpha)
    synth = make(TinyHead().eval(), shape=(1, 1, 2), num_classes=3)
    alpha = dirichlet_concentration(synth.similarity, 0, 1.0)
    draws = synth.sample_targets(0, 1.0, 20000)
    assert torch.allclose(draws.sum(1), torch.ones(20000), atol=1e-5)
    assert torch.allclose(draws.mean(0), alpha / alpha.sum(), atol=0.01)
    peaked = synth.sample_targets(0, 0.1, 20000)  # the small scale: mostly one class per draw
    assert peaked.max(1).values.mean() > draws.max(1).values.mean() + 0.1


def test_both_beta_scales_are_used_for_every_class(bn_teacher):
    synth = make(bn_teacher, num_impressions=40, synthesis_batch_size=2, iterations=1)
    calls = []
    original = synth.sample_targets

    def spy(cls, beta, n):
        calls.append((cls, beta, n))
        return original(cls, beta, n)

    synth.sample_targets = spy
    synth.synthesize(None)
    assert sorted(calls) == sorted((c, b, 2) for c in range(10) for b in (1.0, 0.1))
    assert len(synth.pool) == 40 and synth.images_synthesized == 40
    synth.synthesize(None)  # every DI exists: later rounds make none
    assert len(calls) == 20 and synth.images_synthesized == 40


def test_one_optimisation_round_lowers_the_impressions_loss(bn_teacher):
    synth = make(bn_teacher, num_impressions=16, synthesis_batch_size=16, iterations=40, lr=0.05)
    targets = synth.sample_targets(3, 1.0, 16)
    state = synth.rng.get_state()
    noise = torch.rand((16, *SHAPE), generator=synth.rng)  # what invert starts from
    synth.rng.set_state(state)
    before = soft_cross_entropy(bn_teacher(noise), targets, 20.0).item()
    images, terms = synth.invert(targets)
    assert terms["ce"].item() < before
    assert images.min() >= 0 and images.max() <= 1
    assert terms["target_match"].item() > 0.5  # the teacher now mostly sees the target class


def test_later_batches_of_a_pair_continue_from_the_previous_batch(bn_teacher):
    """The official code re-initialises the noise once per (class, scale) row: batch k of a
    pair starts from batch k-1's final images and Adam state."""
    for carry in (True, False):
        synth = make(bn_teacher, num_impressions=20, synthesis_batch_size=1, iterations=1, lr=0.01,
                     betas="1.0", continue_batches=carry)
        starts = []
        original = synth.invert

        def spy(targets, start=None):
            starts.append(None if start is None else start["images"].clone())
            return original(targets, start)

        synth.invert = spy
        synth.synthesize(None)  # 20 batches of one image: classes 0..9, then 0..9 again
        assert all(s is None for s in starts[:10])
        if carry:
            for c in range(10):  # the second batch of class c starts where the first ended
                assert torch.equal(starts[10 + c], synth.pool.images[c : c + 1])
        else:
            assert all(s is None for s in starts[10:])
        assert not synth.carried


def test_paper_augmentation_holds_the_official_103_variants():
    assert PAPER_TRANSFORMS.shape == (103, 2, 3)
    img = torch.rand(1, 1, 8, 8)
    for index, expected in ((0, img), (18, img.flip(3)), (19, img.flip(2)), (20, img.transpose(2, 3))):
        grid = nn.functional.affine_grid(PAPER_TRANSFORMS[index : index + 1], [1, 1, 8, 8], align_corners=False)
        assert torch.allclose(nn.functional.grid_sample(img, grid, align_corners=False), expected, atol=1e-5)
    out = paper_augment(torch.rand(64, *SHAPE), torch.Generator().manual_seed(0))
    assert out.shape == (64, *SHAPE) and out.min() >= 0 and out.max() <= 1


def test_student_batches_and_state_round_trip(bn_teacher, student):
    synth = make(bn_teacher, num_impressions=30, synthesis_batch_size=10, iterations=2, batch_size=8)
    terms = synth.synthesize(student)
    assert set(terms) == {"di_ce", "di_target_match"}
    losses, s_logits, _ = synth.student_losses(student, synth.sample())
    assert s_logits.shape == (8, 10) and losses["kd"].item() >= 0
    copy = make(bn_teacher, num_impressions=30, synthesis_batch_size=10, iterations=2, batch_size=8)
    copy.load_state_dict(synth.state_dict())
    assert copy.batches_done == 3 and len(copy.pool) == 30
    assert torch.equal(copy.pool.images[:30], synth.pool.images[:30])
    assert torch.equal(copy.sample().images, synth.sample().images)
    assert copy.synthesize(student).keys() == terms.keys() and copy.images_synthesized == 30


def test_unknown_options_and_bad_values_are_refused(bn_teacher):
    with pytest.raises(SynthesizerOptionError, match="accepted: .*betas"):
        make(bn_teacher, not_an_option=1)
    with pytest.raises(SynthesizerOptionError, match="betas"):
        make(bn_teacher, betas="1.0,-2")
    with pytest.raises(SynthesizerOptionError, match="augment"):
        make(bn_teacher, augment="mixup")
    with pytest.raises(SynthesizerOptionError, match="final layer"):
        make(nn.Sequential(nn.Flatten(), nn.Linear(1024, 10)))

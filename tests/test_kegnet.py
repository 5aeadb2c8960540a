"""KegNet (Yoo et al., NeurIPS 2019): conditional generator, latent decoder, diversity term."""
import math

import pytest
import torch

from generators import SynthesizerOptionError, create_synthesizer
from generators.kegnet import KegNetGenerator, diversity_loss

SHAPE = (1, 32, 32)


def make(teacher, **kw):
    small = dict(num_generators=2, generator_steps=3, generator_batch_size=16, images_per_generator=10, batch_size=8)
    small.update(kw)
    return create_synthesizer("kegnet", teacher, image_shape=SHAPE, num_classes=10, device="cpu", seed=0, **small)


def test_diversity_term_is_the_hand_computation():
    z = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    x = torch.tensor([[[0.0, 1.0]], [[2.0, 1.0]]])  # two "images" of two pixels
    # pairs (0,1) and (1,0): d_z = (1 + 9) / 2 = 5, d_x = (2 + 0) / 2 = 1; the diagonal is 0
    expected = math.exp(-(2 * 5 * 1) / 4)
    assert diversity_loss(z, x).item() == pytest.approx(expected, rel=1e-6)
    # identical images for distinct latents: the largest value, 1
    assert diversity_loss(z, torch.ones(2, 1, 2)).item() == pytest.approx(1.0)


def test_pairwise_l1_has_the_broadcast_differences_values_and_gradients():
    from generators.kegnet import pairwise_mean_distance

    rows = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(7, 7, dtype=torch.float64)
    broadcast = (rows.unsqueeze(0) - rows.unsqueeze(1)).abs().mean(2)
    fast = pairwise_mean_distance(rows, "l1")
    assert torch.allclose(fast, broadcast)
    (g_fast,) = torch.autograd.grad((fast * weights).sum(), rows)
    (g_broadcast,) = torch.autograd.grad((broadcast * weights).sum(), rows)
    assert torch.allclose(g_fast, g_broadcast)


def test_generator_is_conditional_and_gives_pixels():
    torch.manual_seed(0)
    gen = KegNetGenerator(10, SHAPE, nz=10, mean=[0.3], std=[0.35]).eval()
    z = torch.randn(4, 10)
    a = gen(torch.nn.functional.one_hot(torch.zeros(4, dtype=torch.long), 10).float(), z)
    b = gen(torch.nn.functional.one_hot(torch.full((4,), 7), 10).float(), z)
    assert a.shape == (4, *SHAPE) and a.min() >= 0 and a.max() <= 1
    assert not torch.allclose(a, b)  # the label changes the image
    assert KegNetGenerator(3, (1, 8, 8)).eval()(torch.eye(3), torch.randn(3, 10)).shape == (3, 1, 8, 8)


def test_training_lowers_the_objective_and_the_decoder_learns_the_latent(bn_teacher):
    synth = make(bn_teacher, lr=1e-2)
    generator, decoder = synth.build(0)
    fixed = synth.sample_inputs(64)

    def total():
        generator.train(), decoder.train()
        with torch.no_grad():
            terms = synth.objective(generator, decoder, *fixed)
        return synth.weighted_total(terms).item(), terms["dec"].item()

    before, dec_before = total()
    optimizer = torch.optim.Adam(list(generator.parameters()) + list(decoder.parameters()), lr=1e-2)
    for _ in range(30):
        terms = synth.objective(generator, decoder, *fixed)
        optimizer.zero_grad()
        synth.weighted_total(terms).backward()
        optimizer.step()
    after, dec_after = total()
    assert after < before and dec_after < dec_before


def test_transfer_set_soft_labels_state_and_student_batches(bn_teacher, student):
    synth = make(bn_teacher)
    terms = synth.synthesize(student)
    assert set(terms) == {"gen_cls", "gen_dec", "gen_div"}
    assert len(synth.pool) == 20 and synth.images_synthesized == 20 and synth.generators_done == 2
    assert torch.allclose(synth.soft_labels.sum(1), torch.ones(20), atol=1e-5)
    with torch.no_grad():  # the stored labels are the teacher's softmax on the stored images
        assert torch.allclose(synth.soft_labels, torch.softmax(bn_teacher(synth.pool.images[:20]), 1), atol=1e-5)
    synth.synthesize(student)  # everything is made: nothing more
    assert synth.images_synthesized == 20
    batch = synth.sample()
    losses, s_logits, t_logits = synth.student_losses(student, batch)
    assert s_logits.shape == (8, 10) and torch.allclose(torch.softmax(t_logits, 1).sum(1), torch.ones(8))
    copy = make(bn_teacher)
    copy.load_state_dict(synth.state_dict())
    assert copy.generators_done == 2 and torch.equal(copy.soft_labels, synth.soft_labels)
    assert torch.equal(copy.sample().images, synth.sample().images)


def test_unknown_options_refused(bn_teacher):
    with pytest.raises(SynthesizerOptionError, match="accepted: .*decoder_layers"):
        make(bn_teacher, not_an_option=1)
    with pytest.raises(SynthesizerOptionError, match="generator_batch_size"):
        make(bn_teacher, generator_batch_size=1)

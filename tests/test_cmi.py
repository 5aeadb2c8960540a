"""CMI (Fang et al., IJCAI 2021): contrastive term, feature bank, synthesis rounds, state."""
import pytest
import torch

from generators import SynthesizerOptionError, create_synthesizer
from generators.cmi import FeatureBank, contrastive_loss, random_resized_crop

SHAPE = (1, 32, 32)


def make(teacher, **kw):
    small = dict(ngf=8, nz=16, synthesis_batch_size=8, iterations=3, bank_size=32, n_negatives=16, head_dim=8,
                 batch_size=8)
    small.update(kw)
    return create_synthesizer("cmi", teacher, image_shape=SHAPE, num_classes=10, device="cpu", seed=0, **small)


def test_contrastive_term_is_the_hand_computation():
    # two current instances and one from the bank, unit vectors in 2-D
    local = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    glob = torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
    t = 0.5
    logits = [[sum(a * b for a, b in zip(li, gj)) / t for gj in glob.tolist()] for li in local.tolist()]
    ce = [-(row[i] - torch.logsumexp(torch.tensor(row), 0).item()) for i, row in enumerate(logits)]
    expected = (ce[0] + ce[1]) / 2 + ce[2]
    assert contrastive_loss(local, glob, 2, t).item() == pytest.approx(expected, rel=1e-6)
    # an empty bank: one mean over the batch
    expected_batch = sum(-(row[i] - torch.logsumexp(torch.tensor(row[:2]), 0).item()) for i, row in
                         enumerate(logits[:2])) / 2
    assert contrastive_loss(local[:2], glob[:2], 2, t).item() == pytest.approx(expected_batch, rel=1e-6)
    # gradients reach the local side only
    local.requires_grad_(True)
    glob.requires_grad_(True)
    contrastive_loss(local, glob, 2, t).backward()
    assert local.grad is not None and glob.grad is None


def test_feature_bank_fills_and_stays_bounded():
    bank = FeatureBank(5, 2)
    assert len(bank) == 0 and bank.sample(3).shape == (0, 2)
    bank.add(torch.arange(6.0).view(3, 2))
    assert len(bank) == 3 and bank.sample(10).shape == (3, 2)
    bank.add(torch.arange(6.0, 14.0).view(4, 2))  # 7 rows into 5 places: the two oldest go
    assert len(bank) == 5
    held = {tuple(r) for r in bank.data.tolist()}
    assert held == {(4.0, 5.0), (6.0, 7.0), (8.0, 9.0), (10.0, 11.0), (12.0, 13.0)}
    copy = FeatureBank(5, 2)
    copy.load_state_dict(bank.state_dict())
    assert torch.equal(copy.data, bank.data) and copy.cursor == bank.cursor


def test_one_round_lowers_its_objective_and_fills_pool_and_bank(bn_teacher, student):
    synth = make(bn_teacher, iterations=25, lr=0.01)
    synth.attach_student(student)
    assert synth.feature_dim == 6 + 16 + 120  # inputs of lenet5_bn's three BatchNorm2d layers
    terms = synth.synthesize(student)
    assert set(terms) == {"inv_bn", "inv_oh", "inv_adv", "inv_cr"}
    losses = synth.last_round_losses
    assert losses[-5:].mean() < losses[0]
    assert len(synth.pool) == 8 and len(synth.bank) == 8
    for _ in range(5):  # the bank stays bounded by bank_size
        synth.synthesize(student)
    assert len(synth.bank) == 32 and len(synth.pool) == 48 and synth.images_synthesized == 48
    assert student.training and all(p.requires_grad for p in student.parameters())
    batch = synth.sample()
    assert batch.images.shape == (8, *SHAPE) and 0 <= batch.images.min() and batch.images.max() <= 1


def test_generator_is_reset_each_round_unless_told_otherwise(bn_teacher, student):
    for every, fresh in ((1, True), (0, False)):
        synth = make(bn_teacher, reset_every=every)
        synth.synthesize(student)
        after_one = [p.detach().clone() for p in synth.generator.parameters()]
        synth.synthesize(student)
        # a reset re-draws the weights: the first layer's weights of round 2 start far from round 1's end
        start_two = synth.generator.project[0].weight
        moved = (start_two - after_one[0]).abs().mean().item()
        assert (moved > 1e-2) == fresh


def test_local_view_is_a_resized_crop():
    images = torch.rand(16, *SHAPE)
    full = random_resized_crop(images, (1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    assert torch.allclose(full, images, atol=1e-5)  # area 1, ratio 1: the image itself
    crops = random_resized_crop(images, (0.25, 0.25), generator=torch.Generator().manual_seed(0))
    assert crops.shape == images.shape and not torch.allclose(crops, images)


def test_state_round_trip(bn_teacher, student):
    synth = make(bn_teacher)
    synth.synthesize(student)
    synth.synthesize(student)
    copy = make(bn_teacher)
    copy.load_state_dict(synth.state_dict())
    assert copy.rounds == 2 and len(copy.pool) == 16 and len(copy.bank) == 16
    assert torch.equal(copy.bank.data, synth.bank.data)
    for a, b in zip(copy.head.parameters(), synth.head.parameters()):
        assert torch.equal(a, b)
    torch.manual_seed(3)  # the student's crop + flip draw from the global generator
    first = copy.sample().images
    torch.manual_seed(3)
    assert torch.equal(first, synth.sample().images)


def test_unknown_options_refused(bn_teacher):
    with pytest.raises(SynthesizerOptionError, match="accepted: .*cr_temperature"):
        make(bn_teacher, not_an_option=1)
    with pytest.raises(SynthesizerOptionError, match="cr_temperature"):
        make(bn_teacher, cr_temperature=0.0)

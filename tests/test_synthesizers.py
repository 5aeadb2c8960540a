"""Each synthesizer: registry, options, one step lowers its own objective, modes, state."""
import pytest
import torch

from generators import SynthesizerOptionError, UnknownSynthesizerError, create_synthesizer, list_synthesizers
from generators.base import augment_batch
from generators.pool import ImagePool

SHAPE = (1, 32, 32)


def make(name, teacher, **kw):
    return create_synthesizer(name, teacher, image_shape=SHAPE, num_classes=10, device="cpu", seed=0, **kw)


def test_registry_lists_methods_and_rejects_unknown():
    assert {"dafl", "deepinversion", "zskt", "dfad"} <= set(list_synthesizers())
    with pytest.raises(UnknownSynthesizerError, match="dafl"):
        make("nope", None)


def test_unknown_option_lists_accepted(bn_teacher):
    with pytest.raises(SynthesizerOptionError, match="accepted: .*generator_lr"):
        make("dafl", bn_teacher, not_an_option=1)
    with pytest.raises(SynthesizerOptionError, match="number"):
        make("dafl", bn_teacher, generator_lr="fast")


def test_dafl_generator_step_lowers_its_objective(bn_teacher, student):
    torch.manual_seed(0)
    synth = make("dafl", bn_teacher, batch_size=64, ngf=8, generator_lr=0.05)
    o = synth.options

    def objective():
        torch.manual_seed(123)
        z = torch.randn(64, o["nz"])
        synth.generator.train()
        with torch.no_grad():
            images = synth.generator(z)
            terms, _ = synth.generator_losses(images)
        return (o["one_hot_weight"] * terms["one_hot"] + o["activation_weight"] * terms["activation"]
                + o["information_entropy_weight"] * terms["information_entropy"]).item()

    before = objective()
    for _ in range(5):
        synth.synthesize(student)
    assert objective() < before
    batch = synth.sample()
    assert batch.images.shape == (64, *SHAPE)
    assert 0 <= batch.images.min() and batch.images.max() <= 1
    assert batch.teacher_logits.shape == (64, 10)


def test_deepinversion_inversion_lowers_objective_and_fills_pool(bn_teacher, student):
    synth = make("deepinversion", bn_teacher, synthesis_batch_size=20, iterations=30, lr=0.1, pool_size=50, batch_size=8)
    torch.manual_seed(0)
    targets = torch.arange(20) % 10
    v0 = torch.randn(20, *SHAPE)
    start = synth.weighted_total(synth.objective(v0.clone(), targets, None)).item()
    synth.synthesize(student)
    assert len(synth.pool) == 20
    images = synth.pool.images[:20]
    v_end = (images - synth.pixel_mean) / synth.pixel_std
    # the optimised batch scores better than noise on the same targets (the ones it was optimised for)
    end = synth.weighted_total(synth.objective(v_end, synth.last_targets, None)).item()
    assert end < start
    assert images.min() >= 0 and images.max() <= 1
    assert synth.sample().images.shape == (8, *SHAPE)
    # the class term alone also fell: the teacher is more sure of the targets than on noise
    ce_end = synth.objective(v_end, synth.last_targets, None)["ce"].item()
    assert ce_end < synth.objective(v0.clone(), synth.last_targets, None)["ce"].item()


def test_deepinversion_refuses_teacher_without_batchnorm(student):
    from teachers import build_model, freeze

    plain = freeze(build_model("lenet5", 10, 1, 32, (0.3,), (0.35,)))
    with pytest.raises(SynthesizerOptionError, match="bn_weight=0"):
        make("deepinversion", plain)
    make("deepinversion", plain, bn_weight=0.0)  # explicit opt-out works


def test_adi_competition_term_uses_student(bn_teacher, student):
    synth = make("deepinversion", bn_teacher, adi=True, synthesis_batch_size=8, iterations=2)
    terms = synth.objective(torch.randn(8, *SHAPE), torch.arange(8), student)
    assert "adi" in terms and 0.0 <= terms["adi"].item() <= 1.0
    was = student.training
    synth.synthesize(student)
    assert student.training == was
    assert all(p.requires_grad for p in student.parameters())


@pytest.mark.parametrize("name", ["zskt", "dfad"])
def test_adversarial_generator_step_raises_discrepancy(name, bn_teacher, student):
    synth = make(name, bn_teacher, batch_size=64, ngf=8, generator_lr=0.01)
    synth.attach_student(student)

    def gap():
        torch.manual_seed(7)
        synth.generator.train()
        with torch.no_grad():
            x = synth.generate(64)
            return synth.discrepancy(student(x), bn_teacher(x)).item()

    before = gap()
    for _ in range(5):
        synth.synthesize(student)
    assert gap() > before
    losses, s_logits, t_logits = synth.student_losses(student, synth.sample())
    assert s_logits.shape == t_logits.shape == (64, 10)
    total = sum(losses.values())
    total.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert not any(p.requires_grad for p in bn_teacher.parameters())
    if name == "zskt":
        assert "attention" in losses and losses["attention"].item() > 0


def test_zskt_student_steps_of_a_round_share_one_batch_as_in_the_official_code(bn_teacher, student):
    synth = make("zskt", bn_teacher, batch_size=16, ngf=8)
    synth.attach_student(student)
    synth.synthesize(student)
    first, again = synth.sample(), synth.sample()
    assert first.images is again.images  # the iteration's latents, relabelled once
    with torch.no_grad():
        assert torch.allclose(first.teacher_logits, bn_teacher(first.images), atol=1e-5)
        assert torch.allclose(first.images, synth.generator(synth.round_latents), atol=1e-6)  # after the G step
    synth.synthesize(student)
    assert not torch.equal(synth.sample().images, first.images)
    fresh = make("zskt", bn_teacher, batch_size=16, ngf=8, repeat_batch=False)
    fresh.synthesize(student)
    assert not torch.equal(fresh.sample().images, fresh.sample().images)


def test_zskt_divergence_is_the_official_per_element_mean(bn_teacher, student):
    from dfkd.core.losses import kl_teacher_student

    s_logits, t_logits = torch.randn(8, 10), torch.randn(8, 10)
    p_t = torch.softmax(t_logits, 1)  # F.kl_div(log p_S, p_T) with its old default reduction="mean"
    official = (p_t * (torch.log_softmax(t_logits, 1) - torch.log_softmax(s_logits, 1))).mean()
    assert torch.allclose(make("zskt", bn_teacher).discrepancy(s_logits, t_logits), official, atol=1e-6)
    per_sample = make("zskt", bn_teacher, kl_per_class=False).discrepancy(s_logits, t_logits)
    assert torch.allclose(per_sample, kl_teacher_student(s_logits, t_logits))


def test_teacher_stays_in_eval_mode_when_student_trains(bn_teacher, student):
    holder = torch.nn.ModuleDict({"teacher": bn_teacher, "student": student})
    holder.train()
    assert not bn_teacher.training and student.training


def test_image_pool_fifo_and_state_round_trip():
    pool = ImagePool(5)
    pool.add(torch.zeros(3, 1, 2, 2))
    pool.add(torch.ones(4, 1, 2, 2))  # wraps: the two oldest zeros are replaced
    assert len(pool) == 5
    assert pool.images.sum().item() == 4 * 4
    other = ImagePool(1)
    other.load_state_dict(pool.state_dict())
    assert torch.equal(other.images, pool.images) and other.cursor == pool.cursor


def test_image_pool_balanced_sampling_draws_rare_labels_as_often_as_common_ones():
    pool = ImagePool(1000)
    # 900 images of label 0 (value 0), 100 of label 1 (value 1); wraps once more below
    pool.add(torch.zeros(900, 1, 1, 1), torch.zeros(900, dtype=torch.long))
    pool.add(torch.ones(100, 1, 1, 1), torch.ones(100, dtype=torch.long))
    gen = torch.Generator().manual_seed(0)
    uniform = pool.sample(4000, gen).mean().item()
    balanced = pool.sample(4000, gen, balanced=True).mean().item()
    assert abs(uniform - 0.1) < 0.03 and abs(balanced - 0.5) < 0.04
    assert pool.label_counts(3).tolist() == [900, 100, 0]
    pool.add(torch.full((50, 1, 1, 1), 2.0), torch.full((50,), 2))  # overwrites 50 zeros
    assert pool.label_counts(3).tolist() == [850, 100, 50]
    other = ImagePool(1)
    other.load_state_dict(pool.state_dict())
    assert torch.equal(other.labels, pool.labels) and torch.equal(other.images, pool.images)


def test_image_pool_refuses_mixed_labelled_and_unlabelled_batches():
    pool = ImagePool(10)
    pool.add(torch.zeros(2, 1, 1, 1), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        pool.add(torch.zeros(2, 1, 1, 1))
    with pytest.raises(ValueError, match="3 labels"):
        pool.add(torch.zeros(2, 1, 1, 1), torch.zeros(3, dtype=torch.long))


def test_augment_batch_keeps_shape_and_range():
    x = torch.rand(6, 1, 8, 8)
    y = augment_batch(x, pad=2, flip=True)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert not torch.equal(x, y)


def test_fast_meta_round_fills_bank_and_moves_meta_generator(bn_teacher, student):
    synth = make("fast", bn_teacher, ngf=8, nz=16, synthesis_batch_size=32, batch_size=8, warmup_rounds=2,
                 bn_weight=1.0, oh_weight=1.0)
    before = [p.detach().clone() for p in synth.generator.parameters()]
    terms = synth.synthesize(student)
    # the first call runs the warm-up rounds (no adversarial term) and then one round with it
    assert synth.rounds == 3 and len(synth.pool) == 96 and synth.images_synthesized == 96
    assert set(terms) == {"inv_oh", "inv_bn", "inv_adv"}
    assert any(not torch.equal(a, b) for a, b in zip(before, synth.generator.parameters()))
    assert student.training and all(p.requires_grad for p in student.parameters())
    batch = synth.sample()
    assert batch.images.shape == (8, *SHAPE) and 0 <= batch.images.min() and batch.images.max() <= 1


def test_fast_balance_classes_files_bank_images_under_the_teachers_prediction(bn_teacher, student):
    synth = make("fast", bn_teacher, ngf=8, nz=16, synthesis_batch_size=32, batch_size=64, warmup_rounds=2,
                 balance_classes=True)
    synth.synthesize(student)
    held = synth.pool.images[: len(synth.pool)]
    with torch.no_grad():
        predicted = bn_teacher(held).argmax(1)
    assert torch.equal(synth.pool.labels[: len(synth.pool)], predicted)
    assert synth.pool.label_counts(synth.num_classes).sum().item() == 96
    assert synth.sample().images.shape == (64, *SHAPE)


def test_fast_meta_generator_learns_to_lower_the_inversion_loss(bn_teacher, student):
    """After meta-training, the *unadapted* meta generator already scores better on the
    inversion loss (BN statistics + one-hot) than it did at initialisation."""
    synth = make("fast", bn_teacher, ngf=8, nz=16, synthesis_batch_size=64, warmup_rounds=0, adv_weight=0.0,
                 bn_momentum=0.0, lr=0.02, bn_weight=1.0, oh_weight=1.0)

    def loss_of_meta_generator():
        torch.manual_seed(5)
        z = torch.randn(64, 16)
        targets = torch.arange(64) % 10
        with torch.no_grad():
            images = synth.generator.train()(z)
            return synth.weighted_total(synth.inversion_terms(images, targets, student, adversarial=False)).item()

    start = loss_of_meta_generator()
    for _ in range(25):
        synth.synthesize(student)
    assert loss_of_meta_generator() < start


def test_fast_class_conditional_generator_uses_the_targets(bn_teacher, student):
    synth = make("fast", bn_teacher, ngf=8, nz=16, synthesis_batch_size=16, batch_size=8, warmup_rounds=1,
                 class_conditional=True)
    g = synth.generator.eval()
    z = torch.randn(4, 16)
    with torch.no_grad():
        a, b = g(z, torch.tensor([0, 0, 0, 0])), g(z, torch.tensor([3, 3, 3, 3]))
    assert not torch.allclose(a, b)  # the label moves the image
    with pytest.raises(ValueError, match="labels"):
        g(z)
    before = synth.generator.label_embedding.weight.detach().clone()
    synth.synthesize(student)
    assert not torch.equal(before, synth.generator.label_embedding.weight)  # meta-learned too
    assert synth.preview(6).shape == (6, *SHAPE)


def test_fast_refuses_teacher_without_batchnorm(student):
    from teachers import build_model, freeze

    plain = freeze(build_model("lenet5", 10, 1, 32, (0.3,), (0.35,)))
    with pytest.raises(SynthesizerOptionError, match="bn_weight=0"):
        make("fast", plain)
    make("fast", plain, bn_weight=0.0, ngf=8)


@pytest.mark.parametrize("name", ["dafl", "deepinversion", "zskt", "dfad", "fast"])
def test_state_dict_round_trip(name, bn_teacher, student):
    kw = {"ngf": 8, "batch_size": 16} if name != "deepinversion" else {"iterations": 2, "synthesis_batch_size": 8, "batch_size": 4}
    if name == "fast":
        kw.update(synthesis_batch_size=8, warmup_rounds=1)
    a = make(name, bn_teacher, **kw)
    a.attach_student(student)
    a.synthesize(student)
    state = a.state_dict()
    b = make(name, bn_teacher, **kw)
    b.load_state_dict(state)
    assert b.images_synthesized == a.images_synthesized
    assert torch.equal(b.rng.get_state(), a.rng.get_state())


def test_pool_memory_grows_with_use_not_with_capacity():
    """A 60,000-image bank of 224 px images would take 36 GB at once; storage grows by doubling."""
    pool = ImagePool(60000)
    pool.add(torch.rand(8, 3, 224, 224))
    assert pool.images.shape[0] == 8
    pool.add(torch.rand(8, 3, 224, 224))
    pool.add(torch.rand(1, 3, 224, 224))
    assert pool.images.shape[0] == 32 and len(pool) == 17
    small = ImagePool(10)
    for value in range(4):
        small.add(torch.full((4, 1, 2, 2), float(value)))
    assert small.images.shape[0] == 10 and sorted(small.images[:, 0, 0, 0].tolist()) == [1.0] * 2 + [2.0] * 4 + [3.0] * 4

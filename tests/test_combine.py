"""Logit combiners and the UHC loss against hand computations on tiny tensors."""
import math

import pytest
import torch

from dfkd.core.losses import kd_loss
from dfkd.multi.combine import LOG_FLOOR, UnknownCombinerError, create_combiner, list_combiners
from dfkd.multi.combiners import uhc_loss

FULL = torch.ones(2, 3, dtype=torch.bool)
# teacher 0 knows union classes {0, 1}, teacher 1 knows {1, 2}
PARTIAL = torch.tensor([[True, True, False], [False, True, True]])
GARBAGE = 100.0  # entries of unknown classes must be ignored


def softmax(values):
    e = [math.exp(v) for v in values]
    return [v / sum(e) for v in e]


def entropy(p):
    return -sum(q * math.log(q) for q in p if q > 0)


def close(tensor, values, tol=1e-5):
    return torch.allclose(tensor.double(), torch.tensor(values, dtype=torch.double), atol=tol)


def test_registry_lists_every_combiner_and_rejects_unknown():
    assert {"mean_prob", "mean_logits", "weighted", "entropy_weighted", "least_ambiguous", "noisy", "pate", "concat",
            "uhc"} <= set(list_combiners())
    with pytest.raises(UnknownCombinerError, match="known combiners: .*entropy_weighted"):
        create_combiner("median")
    with pytest.raises(UnknownCombinerError, match="bad options"):
        create_combiner("mean_prob", tau=1.0)


def test_mean_prob_by_hand():
    za, zb = [1.0, 0.0, 0.0], [0.0, 0.0, 2.0]
    out = create_combiner("mean_prob")(torch.tensor([[za], [zb]]), FULL)
    pa, pb = softmax(za), softmax(zb)
    assert close(out[0].exp(), [(a + b) / 2 for a, b in zip(pa, pb)])


def test_mean_prob_with_partial_class_sets_puts_zero_outside():
    logits = torch.tensor([[[1.0, 3.0, GARBAGE]], [[GARBAGE, 0.0, 1.0]]])
    p = create_combiner("mean_prob")(logits, PARTIAL)[0].exp()
    pa, pb = softmax([1.0, 3.0]), softmax([0.0, 1.0])
    assert close(p, [pa[0] / 2, (pa[1] + pb[0]) / 2, pb[1] / 2])


def test_mean_logits_averages_over_the_teachers_that_know_each_class():
    logits = torch.tensor([[[1.0, 2.0, GARBAGE]], [[GARBAGE, 4.0, 6.0]]])
    assert close(create_combiner("mean_logits")(logits, PARTIAL), [[1.0, 3.0, 6.0]])
    full = torch.tensor([[[1.0, 2.0, 3.0]], [[3.0, 4.0, -1.0]]])
    assert close(create_combiner("mean_logits")(full, FULL), [[2.0, 3.0, 1.0]])


def test_weighted_by_hand_and_weight_count_checked():
    za, zb = [0.5, 1.0, -1.0], [2.0, 0.0, 0.0]
    out = create_combiner("weighted", weights=[1.0, 3.0])(torch.tensor([[za], [zb]]), FULL)
    pa, pb = softmax(za), softmax(zb)
    assert close(out[0].exp(), [0.25 * a + 0.75 * b for a, b in zip(pa, pb)])
    with pytest.raises(ValueError, match="2 weights given for 3 teachers"):
        create_combiner("weighted", weights=[1, 1])(torch.zeros(3, 1, 3), torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="non-negative"):
        create_combiner("weighted", weights=[1, -1])


def test_entropy_weighted_by_hand():
    za, zb = [3.0, 0.0, 0.0], [0.2, 0.1, 0.0]  # a is confident, b is not
    tau = 0.5
    out = create_combiner("entropy_weighted", tau=tau)(torch.tensor([[za], [zb]]), FULL)
    pa, pb = softmax(za), softmax(zb)
    ha, hb = entropy(pa), entropy(pb)
    wa = math.exp(-ha / tau) / (math.exp(-ha / tau) + math.exp(-hb / tau))
    expected = [wa * a + (1 - wa) * b for a, b in zip(pa, pb)]
    assert close(out[0].exp(), expected)
    assert wa > 0.5  # the confident teacher dominates


def test_entropy_weighted_normalized_divides_by_log_class_count():
    logits = torch.tensor([[[2.0, 0.0, GARBAGE]], [[GARBAGE, 1.0, 0.0]]])
    out = create_combiner("entropy_weighted", tau=1.0, normalize=True)(logits, PARTIAL)
    pa, pb = softmax([2.0, 0.0]), softmax([1.0, 0.0])
    ha, hb = entropy(pa) / math.log(2), entropy(pb) / math.log(2)
    wa = math.exp(-ha) / (math.exp(-ha) + math.exp(-hb))
    assert close(out[0].exp(), [wa * pa[0], wa * pa[1] + (1 - wa) * pb[0], (1 - wa) * pb[1]])


def test_least_ambiguous_picks_the_lowest_entropy_teacher_per_sample():
    # sample 0: teacher 0 is sure; sample 1: teacher 1 is sure
    logits = torch.tensor([[[5.0, 0.0, 0.0], [0.1, 0.0, 0.0]],
                           [[0.0, 0.3, 0.0], [0.0, 0.0, 6.0]]])
    comb = create_combiner("least_ambiguous")
    out = comb(logits, FULL)
    assert close(out[0].exp(), softmax([5.0, 0.0, 0.0]))
    assert close(out[1].exp(), softmax([0.0, 0.0, 6.0]))
    # disjoint-ish sets: classes outside the chosen teacher get the floor
    part = torch.tensor([[[4.0, 0.0, GARBAGE]], [[GARBAGE, 0.0, 0.1]]])
    out = comb(part, PARTIAL)
    pa = softmax([4.0, 0.0])
    assert close(out[0, :2].exp(), pa) and math.isclose(out[0, 2].item(), math.log(LOG_FLOOR), rel_tol=1e-5)


def test_noisy_multiplies_logits_by_gaussian_noise_in_training_only():
    logits = torch.tensor([[[1.0, 2.0, 3.0]], [[-1.0, 0.5, 2.0]]])
    comb = create_combiner("noisy", sigma=0.3)
    comb.eval()
    assert torch.allclose(comb(logits, FULL), logits.mean(0))
    comb.train()
    torch.manual_seed(5)
    out = comb(logits, FULL)
    torch.manual_seed(5)
    xi = torch.randn(logits.shape) * 0.3
    assert torch.allclose(out, (logits * (1 + xi)).mean(0))
    assert not torch.allclose(out, logits.mean(0))
    add = create_combiner("noisy", sigma=0.3, additive=True).train()
    torch.manual_seed(5)
    assert torch.allclose(add(logits, FULL), (logits + xi).mean(0))


def test_pate_majority_and_laplace_noisy_max():
    # three teachers: two vote for class 0, one for class 2
    logits = torch.tensor([[[3.0, 0.0, 0.0]], [[2.0, 1.0, 0.0]], [[0.0, 0.0, 1.0]]])
    mask = torch.ones(3, 3, dtype=torch.bool)
    comb = create_combiner("pate", epsilon=0.5)
    assert torch.equal(comb.votes(logits, mask), torch.tensor([[2.0, 0.0, 1.0]]))
    comb.eval()
    out = comb(logits, mask)
    assert out[0].argmax().item() == 0 and close(out, [[0.0, math.log(LOG_FLOOR), math.log(LOG_FLOOR)]], tol=1e-4)
    comb.train()
    for seed in range(20):
        torch.manual_seed(seed)
        got = comb(logits, mask)[0].argmax().item()
        torch.manual_seed(seed)
        noise = torch.distributions.Laplace(0.0, 1.0 / 0.5).sample((1, 3))
        assert got == (torch.tensor([[2.0, 0.0, 1.0]]) + noise).argmax().item()
    # KD against the one-hot target is the cross-entropy with the winner
    student = torch.tensor([[0.3, -0.2, 0.5]])
    comb.eval()
    assert math.isclose(comb.loss(student, logits, mask).item(), -math.log(softmax([0.3, -0.2, 0.5])[0]), rel_tol=1e-4)


def test_concat_places_disjoint_scores_and_refuses_overlap():
    mask = torch.tensor([[True, True, False], [False, False, True]])
    logits = torch.tensor([[[1.0, 2.0, GARBAGE]], [[GARBAGE, GARBAGE, -3.0]]])
    assert close(create_combiner("concat")(logits, mask), [[1.0, 2.0, -3.0]])
    with pytest.raises(ValueError, match=r"classes \[1\] are known by several"):
        create_combiner("concat")(logits, PARTIAL)


def test_default_loss_is_kd_against_the_merged_target():
    logits = torch.tensor([[[1.0, 2.0, 0.0]], [[0.0, 1.0, 1.0]]])
    student = torch.tensor([[0.2, 0.1, -0.4]])
    comb = create_combiner("mean_prob")
    assert torch.allclose(comb.loss(student, logits, FULL, temperature=2.0), kd_loss(student, comb(logits, FULL), 2.0))


def kl(q, p):
    return sum(a * math.log(a / b) for a, b in zip(q, p))


def test_uhc_loss_by_hand():
    s = [0.5, -0.3, 1.2]
    a, b = [1.0, 0.2], [0.0, 2.0]  # teacher a on union classes [0, 1], teacher b on [1, 2]
    got = uhc_loss(torch.tensor([s]), [torch.tensor([a]), torch.tensor([b])], [[0, 1], [1, 2]])
    expected = 0.5 * (kl(softmax(a), softmax([s[0], s[1]])) + kl(softmax(b), softmax([s[1], s[2]])))
    assert math.isclose(got.item(), expected, rel_tol=1e-5)
    # the combiner form with union-placed logits and a mask gives the same number
    placed = torch.tensor([[[1.0, 0.2, GARBAGE]], [[GARBAGE, 0.0, 2.0]]])
    assert math.isclose(create_combiner("uhc").loss(torch.tensor([s]), placed, PARTIAL).item(), expected, rel_tol=1e-5)
    at_t2 = uhc_loss(torch.tensor([s]), [torch.tensor([a]), torch.tensor([b])], [[0, 1], [1, 2]], temperature=2.0)
    assert torch.allclose(create_combiner("uhc").loss(torch.tensor([s]), placed, PARTIAL, temperature=2.0), at_t2)
    assert not math.isclose(at_t2.item(), expected, rel_tol=1e-3)


def test_uhc_loss_is_zero_for_a_student_consistent_with_overlapping_teachers():
    # p_S = (1, 2, 4) / 7 renormalised over {0,1} is (1/3, 2/3), over {1,2} is (1/3, 2/3)
    s = torch.tensor([[0.0, math.log(2), math.log(4)]])
    a = torch.tensor([[5.0, 5.0 + math.log(2)]])  # arbitrary offsets: no calibration needed
    b = torch.tensor([[-1.0, -1.0 + math.log(2)]])
    assert uhc_loss(s, [a, b], [[0, 1], [1, 2]]).item() < 1e-6
    assert uhc_loss(s, [b, a], [[0, 1], [1, 2]]).item() < 1e-6
    with pytest.raises(ValueError, match="3 class indices"):
        uhc_loss(s, [a], [[0, 1, 2]])


def test_mask_shape_is_checked():
    with pytest.raises(ValueError, match="mask must be"):
        create_combiner("mean_logits")(torch.zeros(2, 1, 3), torch.ones(3, 2, dtype=torch.bool))

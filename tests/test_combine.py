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


# ----------------------------------------------------------------------------- calibrated combiners
DISJOINT = torch.tensor([[True, True, False], [False, False, True]])


def running(batches, momentum):
    """Running mean and variance of one logit (``batches``: its values, batch by batch) as
    LogitCalibration's docstring defines them, by hand."""
    mean = var = None
    for n, values in enumerate(batches):
        b_mean = sum(values) / len(values)
        b_var = sum((v - b_mean) ** 2 for v in values) / len(values)
        w = max(1.0 / (n + 1), momentum)
        if mean is None:
            mean, var = b_mean, b_var
            continue
        new = (1 - w) * mean + w * b_mean
        var = (1 - w) * (var + (mean - new) ** 2) + w * (b_var + (b_mean - new) ** 2)
        mean = new
    return mean, var


def test_calibrated_concat_standardises_each_logit_by_running_statistics():
    comb = create_combiner("calibrated_concat", momentum=0.5)
    # teacher 0 (classes 0, 1) is loud, teacher 1 (class 2) quiet; three training batches of two images
    batches = [torch.tensor([[[8.0, 2.0, 0.0], [6.0, 4.0, 0.0]], [[0.0, 0.0, 1.0], [0.0, 0.0, 3.0]]]),
               torch.tensor([[[9.0, 1.0, 0.0], [7.0, 1.0, 0.0]], [[0.0, 0.0, 2.0], [0.0, 0.0, 2.5]]]),
               torch.tensor([[[5.0, 5.0, 0.0], [10.0, 0.0, 0.0]], [[0.0, 0.0, 0.5], [0.0, 0.0, 1.5]]])]
    # before any statistics it is concat
    assert close(comb.eval()(batches[0], DISJOINT), [[8.0, 2.0, 1.0], [6.0, 4.0, 3.0]])
    comb.train()
    for batch in batches:
        comb(batch, DISJOINT)
    cols = {0: (0, 0), 1: (0, 1), 2: (1, 2)}  # union class -> (teacher, column)
    stats = {k: running([[row[c] for row in b[t].tolist()] for b in batches], 0.5) for k, (t, c) in cols.items()}
    # batches 1-3 weigh 1, 1/2 (= max(1/2, 0.5)), 1/2 (momentum: max(1/3, 0.5))
    comb.eval()
    x = torch.tensor([[[7.0, 3.0, 0.0]], [[0.0, 0.0, 2.0]]])
    expected = [(x[t, 0, c].item() - stats[k][0]) / math.sqrt(stats[k][1] + 1e-4) for k, (t, c) in cols.items()]
    assert close(comb(x, DISJOINT), [expected], tol=1e-4)
    assert close(comb.calibration.count, 3.0)
    # eval mode reads the statistics without changing them
    before = comb.calibration.mean.clone()
    comb(batches[0], DISJOINT)
    assert torch.equal(comb.calibration.mean, before)
    # the statistics are the combiner's state
    fresh = create_combiner("calibrated_concat", momentum=0.5).eval()
    fresh.load_state_dict(comb.state_dict())
    assert torch.allclose(fresh(x, DISJOINT), comb(x, DISJOINT))
    assert set(comb.state_dict()) == {"calibration.mean", "calibration.var", "calibration.count"}
    # scale multiplies the merged logits; overlapping classes average the standardised ones
    scaled = create_combiner("calibrated_concat", scale=3.0).eval()
    scaled.load_state_dict(comb.state_dict())
    assert torch.allclose(scaled(x, DISJOINT), 3 * comb(x, DISJOINT))
    plain = create_combiner("calibrated_concat").eval()
    assert close(plain(torch.tensor([[[1.0, 2.0, GARBAGE]], [[GARBAGE, 4.0, 6.0]]]), PARTIAL), [[1.0, 3.0, 6.0]], tol=1e-3)


def test_calibration_turns_the_louder_member_into_the_surer_one():
    """Teacher 0 is loud on every image; once calibrated, the member that is higher than it
    usually is wins: an image where teacher 0 is at its usual level and teacher 1 far above
    its own goes to teacher 1's class, though raw concatenation gives it to teacher 0."""
    torch.manual_seed(0)
    loud = torch.randn(1, 64, 3) * 0.5 + torch.tensor([10.0, 9.0, 0.0])
    quiet = torch.randn(1, 64, 3) * 0.5 + torch.tensor([0.0, 0.0, 2.0])
    comb = create_combiner("calibrated_concat").train()
    comb(torch.cat([loud, quiet]), DISJOINT)
    comb.eval()
    usual0, high1 = torch.tensor([[[10.0, 9.0, 0.0]], [[0.0, 0.0, 4.0]]]).unbind(0)
    assert create_combiner("concat")(torch.stack([usual0, high1]), DISJOINT).argmax(1).item() == 0  # raw: loud wins
    assert comb(torch.stack([usual0, high1]), DISJOINT).argmax(1).item() == 2


def test_group_share_by_hand():
    # teachers 0 and 1 know {0, 1} (one group), teacher 2 knows {2}
    mask = torch.tensor([[True, True, False], [True, True, False], [False, False, True]])
    comb = create_combiner("group_share", momentum=1.0)
    z = torch.tensor([[[2.0, 0.0, GARBAGE]], [[1.0, 1.0, GARBAGE]], [[GARBAGE, GARBAGE, 0.5]]])

    def lse(values):
        return math.log(sum(math.exp(v) for v in values))

    e_group = [(lse([2.0, 0.0]) + lse([1.0, 1.0])) / 2, 0.5]
    p_group = [[(a + b) / 2 for a, b in zip(softmax([2.0, 0.0]), softmax([1.0, 1.0]))] + [0.0], [0.0, 0.0, 1.0]]

    def mix(offsets):
        w = softmax([e - o for e, o in zip(e_group, offsets)])
        return [w[0] * a + w[1] * b for a, b in zip(*p_group)]

    assert close(comb.eval()(z, mask)[0].exp(), mix([0.0, 0.0]))  # nothing seen yet: raw evidence
    comb.train()(torch.tensor([[[3.0, 1.0, 0.0]], [[0.0, 2.0, 0.0]], [[0.0, 0.0, -1.0]]]), mask)
    seen = [(lse([3.0, 1.0]) + lse([0.0, 2.0])) / 2, -1.0]  # momentum 1: the last batch's mean evidence
    assert close(comb.eval()(z, mask)[0].exp(), mix(seen))
    # one group (all members share a class set): mean_prob
    full = torch.tensor([[[1.0, 0.0, 2.0]], [[0.0, 3.0, 0.0]]])
    assert torch.allclose(create_combiner("group_share")(full, FULL), create_combiner("mean_prob")(full, FULL))


def test_members_linked_by_shared_classes_and_the_auto_choice():
    from dfkd.multi.combine import member_components, resolve_combine

    chain = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 1], [0, 0, 1, 1, 0]], dtype=torch.bool)
    assert member_components(chain) == [[0, 1, 2, 3]]  # 0-1 share class 1, 1-3 class 2, 3-2 class 3
    apart = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert member_components(apart) == [[0, 1], [2]]
    assert resolve_combine(DISJOINT)[0] == "calibrated_concat"
    assert resolve_combine(chain)[0] == "uhc"
    name, why = resolve_combine(apart, ["a", "b", "c"])
    assert name == "calibrated_concat" and "a, b | c" in why
    assert resolve_combine(torch.ones(1, 4, dtype=torch.bool))[0] == "mean_logits"


def test_uhc_warns_on_class_sets_that_do_not_connect_and_names_what_to_use():
    from dfkd.multi.combine import CombinerWarning

    with pytest.warns(CombinerWarning, match=r"members a \| b do not overlap.*use --combine calibrated_concat"):
        create_combiner("uhc").check_mask(DISJOINT, ["a", "b"])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_combiner("uhc").check_mask(PARTIAL, ["a", "b"])  # overlapping: no warning


def test_calibrated_share_keeps_each_members_distribution_by_hand():
    comb = create_combiner("calibrated_share", momentum=1.0).train()
    seen = torch.tensor([[[2.0, 0.0, 0.0], [4.0, 2.0, 0.0]], [[0.0, 0.0, 1.0], [0.0, 0.0, 5.0]]])
    comb(seen, DISJOINT)  # means (3, 1 | 3), variances (1, 1 | 4)
    comb.eval()
    z = torch.tensor([[[5.0, 1.0, GARBAGE]], [[GARBAGE, GARBAGE, 4.0]]])
    zhat0 = [(5.0 - 3.0) / math.sqrt(1 + 1e-4), (1.0 - 1.0) / math.sqrt(1 + 1e-4)]
    zhat1 = [(4.0 - 3.0) / math.sqrt(4 + 1e-4)]
    e0, e1 = math.log(sum(math.exp(v) for v in zhat0)), zhat1[0]
    w0 = math.exp(e0) / (math.exp(e0) + math.exp(e1))
    p0 = softmax([5.0, 1.0])
    assert close(comb(z, DISJOINT)[0].exp(), [w0 * p0[0], w0 * p0[1], 1 - w0])
    # the members' shares are calibrated_concat's
    concat = create_combiner("calibrated_concat", momentum=1.0).train()
    concat(seen, DISJOINT)
    shares = concat.eval()(z, DISJOINT)[0].softmax(0)
    assert math.isclose(shares[:2].sum().item(), w0, rel_tol=1e-5)

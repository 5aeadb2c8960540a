"""Each loss term against a hand computation on small tensors."""
import math

import torch
import torch.nn.functional as F

from dfkd.core import losses


def test_kd_loss_matches_hand_kl_with_temperature():
    s = torch.tensor([[1.0, 2.0, 0.5]])
    t = torch.tensor([[0.2, 1.5, 2.5]])
    T = 2.0
    p = [math.exp(v / T) for v in t[0].tolist()]
    p = [v / sum(p) for v in p]
    q = [math.exp(v / T) for v in s[0].tolist()]
    q = [v / sum(q) for v in q]
    expected = T * T * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert abs(losses.kd_loss(s, t, T).item() - expected) < 1e-5


def test_kd_loss_is_zero_for_identical_logits():
    x = torch.randn(4, 5)
    assert losses.kd_loss(x, x.clone()).abs().item() < 1e-6


def test_logit_l1_is_mean_absolute_difference():
    s = torch.tensor([[1.0, -1.0], [0.0, 2.0]])
    t = torch.tensor([[0.0, 1.0], [0.0, -1.0]])
    assert losses.logit_l1(s, t).item() == (1 + 2 + 0 + 3) / 4


def test_one_hot_loss_is_cross_entropy_to_own_argmax():
    t = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    row0 = -math.log(math.exp(2) / (math.exp(2) + 1))
    row1 = -math.log(math.exp(1) / (math.exp(1) + 1))
    assert abs(losses.one_hot_loss(t).item() - (row0 + row1) / 2) < 1e-6


def test_activation_loss_is_negative_mean_abs():
    f = torch.tensor([[1.0, -3.0], [0.0, 2.0]])
    assert losses.activation_loss(f).item() == -1.5


def test_information_entropy_loss_minimum_is_minus_log_k_for_balanced_batch():
    balanced = torch.eye(4) * 50  # each row one confident class: mean prediction is uniform
    assert abs(losses.information_entropy_loss(balanced).item() + math.log(4)) < 1e-4
    collapsed = torch.tensor([[50.0, 0, 0, 0]] * 4)
    assert abs(losses.information_entropy_loss(collapsed).item()) < 1e-4
    # the official DAFL code's log10: the same value divided by ln 10
    assert abs(losses.information_entropy_loss(balanced, base=10).item() + math.log10(4)) < 1e-4


def test_agreement_masked_kl_by_hand():
    s = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    t = torch.tensor([[1.0, 0.5, 0.0], [3.0, 0.0, 0.0]])  # agree on sample 0 only
    p_t, p_s = F.softmax(t[0], 0), F.softmax(s[0], 0)
    kl0 = (p_t * (p_t.log() - p_s.log())).sum()
    assert torch.allclose(losses.agreement_masked_kl(s, t), kl0 / 2, atol=1e-6)


def test_js_divergence_by_hand_and_adi_competition():
    s = torch.tensor([[3.0, 0.0]])
    t = torch.tensor([[0.0, 3.0]])
    T = 3.0
    p = F.softmax(s / T, 1)[0].tolist()
    q = F.softmax(t / T, 1)[0].tolist()
    m = [(a + b) / 2 for a, b in zip(p, q)]
    kl = lambda a, b: sum(bi * (math.log(bi) - math.log(ai)) for ai, bi in zip(a, b))  # KL(M||.) as kl_div(log P, M)
    expected = 0.5 * kl(p, m) + 0.5 * kl(q, m)
    assert abs(losses.js_divergence(s, t, T).item() - expected) < 1e-5
    assert abs(losses.adi_competition_loss(s, t, T).item() - (1 - expected)) < 1e-5
    assert losses.js_divergence(s, s, T).item() < 1e-7


def test_total_variation_terms_by_hand():
    x = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]])
    # d1 (horizontal): [-1, 0]; d2 (vertical): [-1, 0]; d3: x[1,0]-x[0,1] = 0; d4: x[0,0]-x[1,1] = -1
    assert abs(losses.total_variation_l2(x).item() - 3.0) < 1e-6
    assert abs(losses.total_variation_l1(x).item() - (0.5 + 0.5 + 0.0 + 1.0)) < 1e-6
    assert abs(losses.l2_prior(x).item() - math.sqrt(3)) < 1e-6


def test_attention_transfer_by_hand():
    fs = torch.zeros(1, 2, 1, 2)
    fs[0, 0, 0, 0] = 2.0  # attention: mean_c f^2 = [2, 0] -> normalised [1, 0]
    ft = torch.zeros(1, 1, 1, 2)
    ft[0, 0, 0, 1] = 1.0  # [0, 1]
    assert abs(losses.attention_transfer_loss(fs, ft).item() - (1 + 1) / 2) < 1e-6
    assert losses.attention_transfer_loss(ft, ft).item() == 0.0


def test_bn_statistics_loss_uses_norms_not_squares():
    loss = losses.bn_statistics_loss(torch.tensor([3.0, 0.0]), torch.tensor([1.0, 1.0]), torch.zeros(2), torch.tensor([1.0, 5.0]))
    assert abs(loss.item() - (3.0 + 4.0)) < 1e-6

"""dfkd.knowledge: every form of knowledge against a hand computation on tiny tensors, the
invariances its paper claims, zero loss where the student already equals the teacher, gradient
flow into the student and into trainable parts, and the layer-mapping functions."""
import inspect
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dfkd.knowledge as K
from dfkd.core.losses import kd_loss
from dfkd.knowledge import create_knowledge
from dfkd.knowledge.mapping import patient_loss

ATOL = 1e-5


def rng(seed=0):
    return np.random.default_rng(seed)


def tens(a, grad=False):
    return torch.tensor(np.asarray(a), dtype=torch.float32, requires_grad=grad)


def num(x):
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def close(value, expected, atol=ATOL):
    assert abs(num(value) - num(expected)) < atol, (num(value), num(expected))


def huber(x):
    x = abs(x)
    return 0.5 * x * x if x < 1 else x - 0.5


def unit(v):
    n = np.linalg.norm(v)
    return v / n if n > 1e-12 else np.zeros_like(v)


# ----------------------------------------------------------------------------- registry
def test_registry_lists_every_form_and_unknown_name_lists_them():
    names = K.list_knowledge()
    assert names == sorted(["rkd", "sp", "pkt", "cc", "fsp", "nst", "ft", "vid", "crd", "dkd", "pkd", "ckd",
                            "alp_kd", "rail_kd"])
    with pytest.raises(K.UnknownKnowledgeError) as err:
        create_knowledge("hinton")
    assert isinstance(err.value, ValueError)
    assert "known forms of knowledge: " in str(err.value)
    for name in names:
        assert name in str(err.value)
    assert isinstance(create_knowledge("ALP-KD"), K.ALPKD)  # case and '-' are normalised
    with pytest.raises(K.UnknownKnowledgeError, match="bad options"):
        create_knowledge("rkd", no_such_option=1)


def test_needs_and_layers_are_declared():
    for name in K.list_knowledge():
        cls = K.knowledge_class(name)
        assert cls.needs in ("features", "logits")
        assert (cls.layers is None) == (cls.needs == "logits")
        assert cls.layers is None or cls.layers in K.LAYER_KINDS
        assert "arXiv" in cls.__doc__ or "no arXiv" in cls.__doc__
    assert K.DKD.needs == "logits" and K.FSP.layers == "sequence" and K.PKD.layers == "all"


def test_no_host_syncs_or_cuda_calls_in_the_package():
    for path in Path(K.__file__).parent.glob("*.py"):
        text = path.read_text()
        assert ".item()" not in text and ".cuda(" not in text, path.name


# ----------------------------------------------------------------------------- RKD
def rkd_by_hand(s, t, wd=25.0, wa=50.0):
    b = len(s)

    def dist(x):
        d = np.array([[np.linalg.norm(x[i] - x[j]) for j in range(b)] for i in range(b)])
        return d / (d.sum() / (b * (b - 1)))

    ds, dt = dist(s), dist(t)
    loss_d = np.mean([huber(ds[i, j] - dt[i, j]) for i in range(b) for j in range(b)])

    def ang(x, v, i, k):
        return float(unit(x[i] - x[v]) @ unit(x[k] - x[v]))

    loss_a = np.mean([huber(ang(s, v, i, k) - ang(t, v, i, k)) for v, i, k in itertools.product(range(b), repeat=3)])
    return wd * loss_d + wa * loss_a, loss_d, loss_a


def test_rkd_matches_hand_computation():
    r = rng(1)
    s, t = r.normal(size=(4, 3)), r.normal(size=(4, 5))
    total, ld, la = rkd_by_hand(s, t)
    close(create_knowledge("rkd")([tens(s)], [tens(t)]), total, 1e-4)
    close(K.relational.rkd_distance_loss(tens(s), tens(t)), ld)
    close(K.relational.rkd_angle_loss(tens(s), tens(t)), la)


def test_rkd_is_scale_invariant_zero_on_equal_and_gives_gradients():
    r = rng(2)
    s, t = tens(r.normal(size=(5, 4))), tens(r.normal(size=(5, 4)))
    rkd = create_knowledge("rkd")
    base = rkd(s, t)
    close(rkd(3.7 * s, 3.7 * t), base, 1e-4)  # both nets scaled by one factor
    close(rkd(0.2 * s, t), base, 1e-4)  # the paper's normalisation: each side on its own
    close(rkd(t * 2.0, t), 0.0)
    x = s.clone().requires_grad_(True)
    rkd(x, t).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------------- SP
def sp_by_hand(s, t):
    b = len(s)

    def gram(x):
        x = x.reshape(b, -1)
        g = np.array([[x[i] @ x[j] for j in range(b)] for i in range(b)])
        return np.stack([g[i] / np.linalg.norm(g[i]) for i in range(b)])

    return ((gram(t) - gram(s)) ** 2).sum() / b**2


def test_sp_matches_hand_computation_and_sums_pairs():
    r = rng(3)
    s1, t1 = r.normal(size=(3, 2, 2, 2)), r.normal(size=(3, 4, 2, 2))
    s2, t2 = r.normal(size=(3, 5)), r.normal(size=(3, 7))
    sp = create_knowledge("sp")
    close(sp([tens(s1)], [tens(t1)]), sp_by_hand(s1, t1))
    close(sp([tens(s1), tens(s2)], [tens(t1), tens(t2)]), sp_by_hand(s1, t1) + sp_by_hand(s2, t2))
    close(sp(tens(t1), tens(t1)), 0.0)


def test_sp_invariances_that_hold_and_one_that_does_not():
    r = rng(4)
    s, t = tens(r.normal(size=(4, 6))), tens(r.normal(size=(4, 5)))
    sp = create_knowledge("sp")
    base = sp(s, t)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    close(sp(s[:, perm], t), base)  # the same channel permutation in every sample: Gram unchanged
    q, _ = torch.linalg.qr(torch.randn(6, 6))
    close(sp(s @ q, t), base)  # any orthogonal change of the feature space
    close(sp(5.0 * s, t), base)  # scale
    order = torch.tensor([2, 0, 3, 1])
    close(sp(s[order], t[order]), base)  # reordering the batch in both networks
    per_sample = torch.stack([s[i, torch.randperm(6, generator=torch.Generator().manual_seed(i))] for i in range(4)])
    assert abs(num(sp(per_sample, t)) - num(base)) > 1e-4  # different permutations per sample: not invariant


# ----------------------------------------------------------------------------- PKT
def pkt_by_hand(s, t, eps=1e-7, exclude_self=False):
    b = len(s)

    def cond(x):
        x = x / (np.linalg.norm(x, axis=1, keepdims=True) + eps)
        k = np.array([[(x[i] @ x[j] + 1) / 2 for j in range(b)] for i in range(b)])
        if exclude_self:
            np.fill_diagonal(k, 0.0)
        return k / k.sum(axis=1, keepdims=True)

    ps, pt = cond(s), cond(t)
    return np.mean([[pt[i, j] * math.log((pt[i, j] + eps) / (ps[i, j] + eps)) for j in range(b)] for i in range(b)])


def test_pkt_matches_hand_computation_is_scale_invariant_and_zero_on_equal():
    r = rng(5)
    s, t = r.normal(size=(4, 3)), r.normal(size=(4, 6))
    close(create_knowledge("pkt")(tens(s), tens(t)), pkt_by_hand(s, t))
    close(create_knowledge("pkt", exclude_self=True)(tens(s), tens(t)), pkt_by_hand(s, t, exclude_self=True))
    pkt = create_knowledge("pkt")
    close(pkt(tens(s) * 4.0, tens(t)), pkt(tens(s), tens(t)))
    close(pkt(tens(t), tens(t)), 0.0)


# ----------------------------------------------------------------------------- CC
def cc_kernel_by_hand(x, gamma, order):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    b = len(x)
    return np.array([[sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * (x[i] @ x[j]) ** p
                          for p in range(order + 1)) for j in range(b)] for i in range(b)])


def test_cc_matches_hand_computation_and_approximates_the_gaussian_rbf():
    r = rng(6)
    s, t = r.normal(size=(3, 4)), r.normal(size=(3, 2))
    expected = ((cc_kernel_by_hand(s, 0.4, 2) - cc_kernel_by_hand(t, 0.4, 2)) ** 2).mean()
    close(create_knowledge("cc")(tens(s), tens(t)), expected)
    close(create_knowledge("cc")(tens(t), tens(t)), 0.0)
    # the Taylor series converges to exp(-gamma ||a - b||^2) of the normalised features
    x = tens(r.normal(size=(3, 4)))
    u = F.normalize(x, dim=1)
    exact = torch.exp(-0.4 * torch.cdist(u, u).pow(2))
    assert torch.allclose(K.relational.cc_kernel(x, 0.4, 12), exact, atol=1e-5)


# ----------------------------------------------------------------------------- FSP
def fsp_by_hand(a, b):
    n, c1, h, w = a.shape
    c2 = b.shape[1]
    return np.array([[[sum(a[x, i, p, q] * b[x, j, p, q] for p in range(h) for q in range(w)) / (h * w)
                       for j in range(c2)] for i in range(c1)] for x in range(n)])


def test_fsp_matches_hand_computation_and_is_zero_on_equal():
    r = rng(7)
    s = [r.normal(size=(2, 2, 2, 2)), r.normal(size=(2, 3, 2, 2)), r.normal(size=(2, 2, 2, 2))]
    t = [r.normal(size=(2, 2, 2, 2)), r.normal(size=(2, 3, 2, 2)), r.normal(size=(2, 2, 2, 2))]
    expected = sum(((fsp_by_hand(s[i], s[i + 1]) - fsp_by_hand(t[i], t[i + 1])) ** 2).sum() / 2 for i in range(2))
    fsp = create_knowledge("fsp", student_channels=[2, 3, 2], teacher_channels=[2, 3, 2])
    assert fsp.extra_parameters() == []  # equal widths: the paper's setting, nothing to train
    close(fsp([tens(x) for x in s], [tens(x) for x in t]), expected, 1e-4)
    close(fsp([tens(x) for x in t], [tens(x) for x in t]), 0.0)
    with pytest.raises(ValueError, match="at least two"):
        fsp([tens(s[0])], [tens(t[0])])


def test_fsp_adapters_for_mismatched_channels_are_lazy_and_trainable():
    fsp = create_knowledge("fsp")
    with pytest.raises(K.KnowledgeNotBuiltError):
        fsp.extra_parameters()
    s = [torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 4, 2, 2, requires_grad=True)]
    t = [torch.randn(2, 5, 4, 4), torch.randn(2, 4, 2, 2)]
    fsp(s, t).backward()
    params = fsp.extra_parameters()
    assert len(params) == 1 and params[0].shape == (5, 3, 1, 1) and params[0].grad is not None
    assert s[0].grad is not None and s[1].grad is not None


# ----------------------------------------------------------------------------- NST
def nst_by_hand(s, t):
    def norm(x):
        x = x.reshape(x.shape[0], x.shape[1], -1)
        return x / np.linalg.norm(x, axis=2, keepdims=True)

    fs, ft = norm(s), norm(t)
    out = []
    for x in range(len(s)):
        def k(a, b):
            return np.mean([[(a[i] @ b[j]) ** 2 for j in range(len(b))] for i in range(len(a))])
        out.append(k(ft[x], ft[x]) + k(fs[x], fs[x]) - 2 * k(fs[x], ft[x]))
    return np.mean(out)


def test_nst_matches_hand_computation_invariances_and_zero():
    r = rng(8)
    s, t = r.normal(size=(2, 3, 2, 2)), r.normal(size=(2, 4, 2, 2))
    nst = create_knowledge("nst")
    close(nst(tens(s), tens(t)), nst_by_hand(s, t))
    close(nst(tens(s)[:, [2, 0, 1]], tens(t)), nst_by_hand(s, t))  # channel order
    close(nst(tens(s) * tens([1.0, 3.0, 0.5])[None, :, None, None], tens(t)), nst_by_hand(s, t))  # channel scale
    close(nst(tens(t), tens(t)), 0.0)
    # different resolutions: the larger map is average-pooled to the smaller
    big = r.normal(size=(2, 3, 4, 4))
    pooled = big.reshape(2, 3, 2, 2, 2, 2).mean(axis=(3, 5))
    close(nst(tens(big), tens(t)), nst_by_hand(pooled, t))


# ----------------------------------------------------------------------------- FT
def test_ft_factor_loss_formula_and_two_stage_training():
    torch.manual_seed(0)
    ft = create_knowledge("ft", student_channels=[3], teacher_channels=[4])
    assert len(ft.paraphrasers) == 1 and ft.paraphrasers[0].encoder[3].out_channels == 2  # rate k = 0.5
    teacher = torch.randn(8, 4, 3, 3).relu()
    # stage 1: a few steps of paraphraser pre-training lower the reconstruction loss
    opt = torch.optim.Adam(ft.paraphraser_parameters(), lr=1e-2)
    first = num(ft.reconstruction_loss(teacher))
    for _ in range(15):
        opt.zero_grad()
        ft.reconstruction_loss(teacher).backward()
        opt.step()
    opt.zero_grad()
    assert num(ft.reconstruction_loss(teacher)) < first
    ft.freeze_paraphraser()
    ft.train()
    assert not ft.paraphrasers[0].training and ft.translators[0].training
    # stage 2: the loss is the mean |F_S/||F_S|| - F_T/||F_T|||
    student = torch.randn(8, 3, 3, 3, requires_grad=True)
    loss = ft(student, teacher)
    fs = ft.translators[0](student).detach().reshape(8, -1).numpy()
    ftf = ft.paraphrasers[0].encoder(teacher).detach().reshape(8, -1).numpy()
    expected = np.mean([np.abs(unit(fs[i]) - unit(ftf[i])) for i in range(8)])
    close(loss, expected)
    loss.backward()
    params = ft.extra_parameters()
    assert params and all(p.grad is not None for p in params)
    assert {id(p) for p in params} == {id(p) for p in ft.translators.parameters()}
    assert all(p.grad is None and not p.requires_grad for p in ft.paraphrasers.parameters())
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_ft_builds_lazily_from_first_batch():
    ft = create_knowledge("ft")
    with pytest.raises(K.KnowledgeNotBuiltError):
        ft.extra_parameters()
    ft(torch.randn(2, 3, 2, 2), torch.randn(2, 6, 4, 4))  # resolutions differ: pooled
    assert ft.student_channels == [3] and ft.teacher_channels == [6] and ft.extra_parameters()


# ----------------------------------------------------------------------------- VID
def test_vid_matches_hand_negative_log_likelihood():
    torch.manual_seed(0)
    vid = create_knowledge("vid", student_channels=[2], teacher_channels=[3])
    var0 = vid.variances()[0]
    assert torch.allclose(var0, torch.full((3,), 5.0))  # init_variance from the authors' code
    with torch.no_grad():
        vid.heads[0].alpha.copy_(torch.tensor([0.3, -1.0, 2.0]))
    r = rng(9)
    s, t = r.normal(size=(2, 2, 2, 2)), r.normal(size=(2, 3, 2, 2))
    w = [c.weight.detach().numpy()[:, :, 0, 0] for c in vid.heads[0].regressor if isinstance(c, torch.nn.Conv2d)]
    var = np.log1p(np.exp([0.3, -1.0, 2.0])) + 1e-5
    terms = []
    for b, h, x in itertools.product(range(2), range(2), range(2)):
        mu = w[2] @ np.maximum(w[1] @ np.maximum(w[0] @ s[b, :, h, x], 0), 0)
        terms += [0.5 * (math.log(var[c]) + (t[b, c, h, x] - mu[c]) ** 2 / var[c]) for c in range(3)]
    student = tens(s, grad=True)
    loss = vid(student, tens(t))
    close(loss, np.mean(terms))
    loss.backward()
    assert student.grad is not None and vid.heads[0].alpha.grad is not None
    assert all(p.grad is not None for p in vid.extra_parameters())


# ----------------------------------------------------------------------------- CRD
def crd_side_by_hand(pos, neg, n, z, eps=1e-7):
    total = sum(math.log(p / (p + n * z + eps)) for p in pos)
    total += sum(math.log(n * z / (e + n * z + eps)) for row in neg for e in row)
    return -total / len(pos)


def set_heads(crd, ws, wt):
    with torch.no_grad():
        crd.embed_s.weight.copy_(tens(ws))
        crd.embed_s.bias.zero_()
        crd.embed_t.weight.copy_(tens(wt))
        crd.embed_t.bias.zero_()


def test_crd_in_batch_negatives_match_hand_nce():
    r = rng(10)
    crd = create_knowledge("crd", student_dim=3, teacher_dim=2, feat_dim=2, temperature=0.5, negatives="batch")
    ws, wt = r.normal(size=(2, 3)), r.normal(size=(2, 2))
    set_heads(crd, ws, wt)
    s, t = r.normal(size=(3, 3)), r.normal(size=(3, 2))
    vs = [unit(ws @ x) for x in s]
    vt = [unit(wt @ x) for x in t]
    e = np.array([[math.exp(vs[i] @ vt[j] / 0.5) for j in range(3)] for i in range(3)])
    z = e.mean()
    pos = [e[i, i] for i in range(3)]
    neg_s = [[e[i, j] for j in range(3) if j != i] for i in range(3)]  # student anchors: rows
    neg_t = [[e[i, j] for i in range(3) if i != j] for j in range(3)]  # teacher anchors: columns
    expected = crd_side_by_hand(pos, neg_s, 2, z) + crd_side_by_hand(pos, neg_t, 2, z)
    close(crd(tens(s), tens(t)), expected)


def test_crd_memory_negatives_match_hand_nce_and_queue_updates():
    r = rng(11)
    crd = create_knowledge("crd", student_dim=3, teacher_dim=3, feat_dim=2, temperature=0.5, num_negatives=3)
    ws, wt = r.normal(size=(2, 3)), r.normal(size=(2, 3))
    set_heads(crd, ws, wt)
    mem_s = np.stack([unit(v) for v in r.normal(size=(3, 2))])
    mem_t = np.stack([unit(v) for v in r.normal(size=(3, 2))])
    crd.memory_s.copy_(tens(mem_s))
    crd.memory_t.copy_(tens(mem_t))
    s, t = r.normal(size=(2, 3)), r.normal(size=(2, 3))
    vs = np.stack([unit(ws @ x) for x in s])
    vt = np.stack([unit(wt @ x) for x in t])
    pos = [math.exp(vs[i] @ vt[i] / 0.5) for i in range(2)]
    neg_s = [[math.exp(vs[i] @ m / 0.5) for m in mem_t] for i in range(2)]  # student anchor vs teacher memory
    neg_t = [[math.exp(vt[i] @ m / 0.5) for m in mem_s] for i in range(2)]
    z_s = np.mean([[pos[i]] + neg_s[i] for i in range(2)])
    z_t = np.mean([[pos[i]] + neg_t[i] for i in range(2)])
    expected = crd_side_by_hand(pos, neg_s, 3, z_s) + crd_side_by_hand(pos, neg_t, 3, z_t)
    student = tens(s, grad=True)
    loss = crd(student, tens(t))
    close(loss, expected)
    loss.backward()  # the queue update after scoring must not break this step's graph
    assert student.grad is not None
    assert all(p.grad is not None for p in crd.extra_parameters()) and len(crd.extra_parameters()) == 4
    # FIFO: the two new embeddings replaced the two oldest entries; Z is now fixed
    assert np.allclose(crd.memory_s.numpy(), np.concatenate([vs, mem_s[2:]]), atol=1e-6)
    assert np.allclose(crd.memory_t.numpy(), np.concatenate([vt, mem_t[2:]]), atol=1e-6)
    z_fixed = crd.nce_z.clone()
    crd(tens(r.normal(size=(2, 3))), tens(r.normal(size=(2, 3))))
    assert torch.equal(crd.nce_z, z_fixed)
    # eval mode leaves the queue alone
    crd.eval()
    before = crd.memory_s.clone()
    crd(tens(s), tens(t))
    assert torch.equal(crd.memory_s, before)
    # the pointer and the fixed Z survive a state_dict round trip
    other = create_knowledge("crd", student_dim=3, teacher_dim=3, feat_dim=2, temperature=0.5, num_negatives=3)
    other.load_state_dict(crd.state_dict())
    assert other._ptr == crd._ptr and other._z_ready


def test_crd_sampled_negatives_are_seeded_and_heads_lazy():
    crd = create_knowledge("crd", feat_dim=4, num_negatives=5, memory_size=32)
    with pytest.raises(K.KnowledgeNotBuiltError):
        crd.extra_parameters()
    crd.eval()
    s, t = torch.randn(3, 6), torch.randn(3, 8)
    a = crd(s, t, generator=torch.Generator().manual_seed(3))
    b = crd(s, t, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and crd.embed_s.in_features == 6 and crd.embed_t.in_features == 8


# ----------------------------------------------------------------------------- DKD
def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def dkd_by_hand(s, t, y, alpha=1.0, beta=8.0, T=4.0):
    tckd = nckd = 0.0
    for i in range(len(s)):
        ps, pt = softmax(s[i] / T), softmax(t[i] / T)
        bs, bt = [ps[y[i]], 1 - ps[y[i]]], [pt[y[i]], 1 - pt[y[i]]]
        tckd += sum(q * math.log(q / p) for p, q in zip(bs, bt))
        others = [k for k in range(len(s[i])) if k != y[i]]
        qs, qt = softmax(s[i][others] / T), softmax(t[i][others] / T)
        nckd += sum(q * math.log(q / p) for p, q in zip(qs, qt))
    n = len(s)
    return T * T * tckd / n, T * T * nckd / n, alpha * T * T * tckd / n + beta * T * T * nckd / n


def test_dkd_matches_hand_computation_with_teacher_argmax_and_warmup():
    r = rng(12)
    s, t = r.normal(size=(3, 5)) * 3, r.normal(size=(3, 5)) * 3
    y = t.argmax(axis=1)
    tckd, nckd, total = dkd_by_hand(s, t, y)
    dkd = create_knowledge("dkd")
    close(dkd(tens(s), tens(t)), total)  # data-free: the teacher's argmax is the target
    close(dkd(tens(s), tens(t), targets=torch.tensor(y)), total)
    close(dkd(tens(s), tens(t), epoch=5), total * 5 / 20)  # linear warm-up over 20 epochs
    close(dkd(tens(s), tens(t), epoch=40), total)
    other = np.array([1, 2, 3])
    close(create_knowledge("dkd", alpha=2.0, beta=0.5)(tens(s), tens(t), targets=torch.tensor(other)),
          dkd_by_hand(s, t, other, 2.0, 0.5)[2])
    a, b = K.logit.dkd_terms(tens(s), tens(t), torch.tensor(y), 4.0)
    close(a, tckd)
    close(b, nckd)
    close(dkd(tens(t), tens(t)), 0.0)


def test_dkd_reformulates_classical_kd():
    # the paper's eq. 5: KD = TCKD + (1 - p_y^T) NCKD, per sample
    s, t = torch.tensor([[1.0, 2.0, 0.5, -1.0]]), torch.tensor([[0.3, 2.5, 1.0, 0.0]])
    y = torch.tensor([1])
    tckd, nckd = K.logit.dkd_terms(s, t, y, 2.0)
    p_y = F.softmax(t / 2.0, dim=1)[0, 1]
    close(tckd + (1 - p_y) * nckd, kd_loss(s, t, 2.0))


def test_dkd_gradient_reaches_student_logits():
    s = torch.randn(4, 6, requires_grad=True)
    create_knowledge("dkd")(s, torch.randn(4, 6)).backward()
    assert s.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- layer mapping
def test_pkd_mapping_follows_the_paper():
    assert K.pkd_layers(12, 6, "skip") == [2, 4, 6, 8, 10]
    assert K.pkd_layers(12, 6, "skip", include_last=True) == [2, 4, 6, 8, 10, 12]
    assert K.pkd_layers(12, 6, "last") == [7, 8, 9, 10, 11]
    assert K.pkd_layers(12, 3, "skip") == [4, 8] and K.pkd_layers(12, 3, "last") == [10, 11]
    with pytest.raises(ValueError):
        K.pkd_layers(6, 12)
    with pytest.raises(ValueError):
        K.pkd_layers(12, 6, "middle")


def test_ckd_groups():
    assert K.ckd_groups(12, 4) == [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]]
    assert K.ckd_groups(12, 4, "cross") == [[1, 5, 9], [2, 6, 10], [3, 7, 11], [4, 8, 12]]
    groups = K.ckd_groups(12, 5)
    assert sorted(sum(groups, [])) == list(range(1, 13)) and len(groups) == 5
    assert [g[-1] for g in K.ckd_groups(12, 6)] == K.pkd_layers(12, 6, include_last=True)


def test_rail_kd_draws_are_sorted_distinct_and_reproducible():
    def draws(seed):
        g = torch.Generator().manual_seed(seed)
        return [K.rail_kd_layers(12, 6, g) for _ in range(20)]

    a, b = draws(7), draws(7)
    assert a == b
    assert draws(8) != a
    for layers in a:
        assert layers == sorted(set(layers)) and len(layers) == 5 and 1 <= layers[0] and layers[-1] <= 11
    assert len({tuple(x) for x in a}) > 1  # the mapping changes from step to step
    assert K.rail_kd_layers(12, 6, torch.Generator().manual_seed(0), include_last=True)[-1] == 12


def test_alp_kd_weights_by_hand():
    s = np.array([[1.0, 0.0], [0.5, -1.0]])
    t = np.array([[[1.0, 1.0], [0.0, 2.0], [-1.0, 0.0]], [[0.2, 0.1], [1.0, 1.0], [0.0, -1.0]]])
    w = K.alp_kd_weights(tens(s), tens(t))
    for b in range(2):
        assert np.allclose(w[b].numpy(), softmax(t[b] @ s[b]), atol=1e-6)


def layers_of(seed, count, batch=3, dim=4, scale=1.0):
    r = rng(seed)
    return [r.normal(size=(batch, dim)) * scale for _ in range(count)]


def test_pkd_loss_by_hand_zero_when_matched_and_adapters():
    s, t = layers_of(13, 3), layers_of(14, 6)
    expected = sum(np.mean([np.sum((unit(s[j][b]) - unit(t[k - 1][b])) ** 2) for b in range(3)])
                   for j, k in enumerate([2, 4]))
    pkd = create_knowledge("pkd", teacher_layers=6, student_layers=3)
    close(pkd([tens(x) for x in s], [tens(x) for x in t]), expected)
    matched = [tens(t[1]) * 2, tens(t[3]) * 0.5, tens(s[2])]  # student layers 1, 2 equal teacher 2, 4 up to scale
    close(pkd(matched, [tens(x) for x in t]), 0.0)
    wide = create_knowledge("pkd", teacher_layers=6, student_layers=3, student_dims=2, teacher_dims=4)
    assert len(wide.adapters) == 2 and len(wide.extra_parameters()) == 4
    x = torch.randn(3, 2, requires_grad=True)
    wide([x, torch.randn(3, 2), torch.randn(3, 2)], [tens(v) for v in t]).backward()
    assert x.grad is not None and all(p.grad is not None for p in wide.extra_parameters())


def test_ckd_loss_by_hand_with_given_projections():
    s, t = layers_of(15, 2, dim=3), layers_of(16, 4, dim=2)
    ckd = create_knowledge("ckd", teacher_layers=4, student_layers=2, student_dims=3, teacher_dims=2)
    assert ckd.groups == [[1, 2], [3, 4]]
    r = rng(17)
    ws = [r.normal(size=(3, 4)) for _ in range(2)]
    with torch.no_grad():
        for proj, w in zip(ckd.combine, ws):
            proj.weight.copy_(tens(w))
            proj.bias.fill_(0.1)
    expected = 0.0
    for j, g in enumerate([[1, 2], [3, 4]]):
        f = np.concatenate([t[k - 1] for k in g], axis=1) @ ws[j].T + 0.1
        expected += np.mean((s[j] - f) ** 2)
    student = [tens(x, grad=True) for x in s]
    loss = ckd(student, [tens(x) for x in t])
    close(loss, expected)
    loss.backward()
    assert all(x.grad is not None for x in student) and all(p.grad is not None for p in ckd.extra_parameters())
    custom = create_knowledge("ckd", teacher_layers=4, student_layers=2, groups=[[1, 2, 3], [3, 4]])
    custom([tens(x) for x in s], [tens(x) for x in t])
    assert custom.combine[0].in_features == 6


def test_alp_kd_loss_by_hand_and_gradient():
    s, t = layers_of(18, 2), layers_of(19, 3)
    expected = 0.0
    for j in range(2):
        target = np.stack([sum(w * t[k][b] for k, w in enumerate(softmax(np.array([t[k][b] @ s[j][b] for k in range(3)]))))
                           for b in range(3)])
        expected += np.mean((s[j] - target) ** 2)
    alp = create_knowledge("alp_kd", teacher_layers=3, student_layers=2)
    student = [tens(x, grad=True) for x in s]
    loss = alp(student, [tens(x) for x in t])
    close(loss, expected)
    loss.backward()
    assert all(x.grad is not None for x in student) and alp.extra_parameters() == []


def test_rail_kd_loss_uses_its_seeded_draw():
    s, t = layers_of(20, 3), layers_of(21, 8)
    a = create_knowledge("rail_kd", teacher_layers=8, student_layers=3, generator=torch.Generator().manual_seed(5))
    b = create_knowledge("rail_kd", teacher_layers=8, student_layers=3, generator=torch.Generator().manual_seed(5))
    st, tt = [tens(x) for x in s], [tens(x) for x in t]
    for _ in range(4):
        la, lb = a(st, tt), b(st, tt)
        assert a.last_mapping == b.last_mapping and torch.equal(la, lb)
        expected = sum(np.mean([np.sum((unit(s[j][i]) - unit(t[k - 1][i])) ** 2) for i in range(3)])
                       for j, k in enumerate(a.last_mapping))
        close(la, expected)



def test_teacher_width_projects_teacher_layers_of_different_widths():
    r = rng(22)
    s = [r.normal(size=(3, 4)) for _ in range(2)]
    t = [r.normal(size=(3, d)) for d in (6, 4, 5)]  # a CNN's blocks: one width per layer
    st, tt = [tens(x, grad=True) for x in s], [tens(x) for x in t]
    with pytest.raises(ValueError, match="different widths"):
        create_knowledge("alp_kd", teacher_layers=3, student_layers=2)(st, tt)
    alp = create_knowledge("alp_kd", teacher_layers=3, student_layers=2, teacher_width=4)
    loss = alp(st, tt)
    assert sorted(alp.teacher_projections) == ["1", "3"] and not alp.adapters  # layer 2 is already 4 wide
    proj = {k: m.weight.double().numpy() for k, m in alp.teacher_projections.items()}
    tp = [t[k] @ proj[str(k + 1)].T if str(k + 1) in proj else t[k] for k in range(3)]
    expected = 0.0
    for j in range(2):
        target = np.stack([sum(w * tp[k][b] for k, w in enumerate(softmax(np.array([tp[k][b] @ s[j][b] for k in range(3)]))))
                           for b in range(3)])
        expected += np.mean((s[j] - target) ** 2)
    close(loss, expected)
    loss.backward()
    assert alp.extra_parameters() == [] and all(x.grad is not None for x in st)  # ALP-KD's maps are fixed
    rail = create_knowledge("rail_kd", teacher_layers=3, student_layers=2, teacher_width=2,
                            generator=torch.Generator().manual_seed(0))
    rail(st, tt).backward()
    drawn = rail.teacher_projections[str(rail.last_mapping[0])]
    assert len(rail.extra_parameters()) == 8 and drawn.weight.grad is not None and rail.adapters["1"].weight.grad is not None
    value = rail(st, tt)  # RAIL-KD's projections learn with the student (6 teacher, 2 adapter tensors)
    assert sorted(rail.teacher_projections) == ["1", "2", "3"] and sorted(rail.adapters) == ["1"]
    (k,) = rail.last_mapping
    hs = rail.adapters["1"](st[0])
    close(value, patient_loss(hs, rail.teacher_projections[str(k)](tt[k - 1])))
    with pytest.raises(ValueError, match="teacher_width must be a positive integer"):
        create_knowledge("alp_kd", teacher_layers=3, student_layers=2, teacher_width=0)

# ----------------------------------------------------------------------------- every loss: gradients
FEATURE_CASES = {
    "rkd": ([(4, 6)], [(4, 8)]),
    "sp": ([(4, 3, 2, 2)], [(4, 5, 2, 2)]),
    "pkt": ([(4, 6)], [(4, 8)]),
    "cc": ([(4, 6)], [(4, 8)]),
    "fsp": ([(4, 3, 4, 4), (4, 2, 2, 2)], [(4, 3, 4, 4), (4, 2, 2, 2)]),
    "nst": ([(4, 3, 2, 2)], [(4, 5, 4, 4)]),
    "ft": ([(4, 3, 2, 2)], [(4, 4, 2, 2)]),
    "vid": ([(4, 3, 2, 2)], [(4, 4, 2, 2)]),
    "crd": ([(4, 6)], [(4, 8)]),
    "pkd": ([(4, 5)] * 3, [(4, 6)] * 6),
    "ckd": ([(4, 5)] * 3, [(4, 6)] * 6),
    "alp_kd": ([(4, 5)] * 3, [(4, 6)] * 6),
    "rail_kd": ([(4, 5)] * 3, [(4, 6)] * 6),
}
OPTIONS = {"crd": {"num_negatives": 16}, "pkd": {"teacher_layers": 6, "student_layers": 3},
           "ckd": {"teacher_layers": 6, "student_layers": 3}, "alp_kd": {"teacher_layers": 6, "student_layers": 3},
           "rail_kd": {"teacher_layers": 6, "student_layers": 3}}


@pytest.mark.parametrize("name", sorted(FEATURE_CASES))
def test_gradient_reaches_student_features_and_trainable_parts(name):
    torch.manual_seed(0)
    loss_fn = create_knowledge(name, **OPTIONS.get(name, {}))
    assert loss_fn.needs == "features"
    s_shapes, t_shapes = FEATURE_CASES[name]
    student = [torch.randn(*shape, requires_grad=True) for shape in s_shapes]
    teacher = [torch.randn(*shape) for shape in t_shapes]
    if name == "ft":
        loss_fn.reconstruction_loss(teacher)
        loss_fn.freeze_paraphraser()
    loss = loss_fn(student, teacher)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert any(x.grad is not None and x.grad.abs().sum() > 0 for x in student)
    for p in loss_fn.extra_parameters():
        assert p.grad is not None, name
    if name in ("ft", "vid", "crd", "ckd", "pkd", "alp_kd", "rail_kd"):  # widths differ: something to train
        assert loss_fn.extra_parameters(), name


def test_module_sizes_stay_small():
    for path in Path(K.__file__).parent.glob("*.py"):
        assert len(path.read_text().splitlines()) <= 400, path.name
    assert inspect.getdoc(K.create_knowledge)


def test_losses_compute_in_float32_under_autocast():
    torch.manual_seed(0)
    s, t = torch.randn(4, 6), torch.randn(4, 8)
    for name in ("pkt", "sp", "rkd"):
        loss_fn = create_knowledge(name)
        plain = loss_fn(s, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = loss_fn(s.bfloat16(), t.bfloat16())
        assert mixed.dtype == torch.float32
        close(mixed, loss_fn(s.bfloat16().float(), t.bfloat16().float()))
        assert torch.isfinite(plain)

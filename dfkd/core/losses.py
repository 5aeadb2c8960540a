"""Loss terms shared by the distillation engine and the synthesizers.

Every function takes logits/features as tensors and returns a scalar tensor. The formula and
the paper each term comes from are in its docstring; tests check each against a hand
computation on small tensors.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Knowledge-distillation loss (Hinton et al., 2015, arXiv:1503.02531).

    ``T^2 * KL(softmax(t/T) || softmax(s/T))`` averaged over the batch. With ``T=1`` this is
    exactly DAFL's ``kdloss`` (KL summed over classes, divided by batch size).
    """
    t = teacher_logits.float() / temperature
    s = student_logits.float() / temperature
    return F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), reduction="batchmean", log_target=True) * (
        temperature**2
    )


def kl_teacher_student(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Belief-matching divergence of ZSKT (Micaelli & Storkey, NeurIPS 2019): ``KL(p_T || p_S)``
    at temperature 1, averaged over the batch. The generator maximises it, the student
    minimises it."""
    return kd_loss(student_logits, teacher_logits, temperature=1.0)


def logit_l1(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """DFAD's model discrepancy (Fang et al., 2019, arXiv:1912.11006):
    ``mean |z_T - z_S|`` over batch and classes (mean absolute error of the logits)."""
    return (student_logits.float() - teacher_logits.float()).abs().mean()


def one_hot_loss(teacher_logits: torch.Tensor) -> torch.Tensor:
    """DAFL's one-hot loss (Chen et al., ICCV 2019): ``CE(z_T, argmax z_T)``, the teacher's
    cross-entropy against its own prediction; low when the teacher is confident."""
    return F.cross_entropy(teacher_logits.float(), teacher_logits.detach().argmax(dim=1))


def activation_loss(features: torch.Tensor) -> torch.Tensor:
    """DAFL's activation loss: ``-mean |f_T|`` over the teacher's penultimate features;
    minimising it favours inputs that strongly activate the teacher's filters."""
    return -features.float().abs().mean()


def information_entropy_loss(teacher_logits: torch.Tensor, base: float = math.e) -> torch.Tensor:
    """DAFL's information-entropy loss: ``sum_k pbar_k log_b pbar_k`` with
    ``pbar = mean_i softmax(z_T,i)``, i.e. the negative entropy of the batch's mean prediction.
    Minimising it balances the classes in a batch (its minimum is ``-log_b K``). The paper
    writes the entropy without a base; the official code uses ``log10`` (``base=10``), so its
    weight of 5 is ``5 / ln 10 = 2.17`` in natural-log units."""
    mean_prob = F.softmax(teacher_logits.float(), dim=1).mean(dim=0)
    return (mean_prob * torch.log(mean_prob.clamp_min(1e-12))).sum() / math.log(base)


def js_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 3.0) -> torch.Tensor:
    """Jensen-Shannon divergence used by Adaptive DeepInversion (Yin et al., CVPR 2020).

    ``JS = 0.5 KL(P||M) + 0.5 KL(Q||M)``, ``P = softmax(z_S/T)``, ``Q = softmax(z_T/T)``,
    ``M = (P+Q)/2`` (natural log, batch mean), with the paper code's clamp of P, Q, M to
    [0.01, 0.99] and ``T = 3``.
    """
    p = F.softmax(student_logits.float() / temperature, dim=1)
    q = F.softmax(teacher_logits.float() / temperature, dim=1)
    m = (0.5 * (p + q)).clamp(0.01, 0.99)
    p, q = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99)
    kl_pm = (m * (m.log() - p.log())).sum(dim=1).mean()
    kl_qm = (m * (m.log() - q.log())).sum(dim=1).mean()
    return 0.5 * kl_pm + 0.5 * kl_qm


def adi_competition_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 3.0) -> torch.Tensor:
    """ADI's competition term: ``1 - clamp(JS(P_S, P_T), 0, 1)``. Minimising it pushes the
    synthesized images to where student and teacher disagree."""
    return 1.0 - js_divergence(student_logits, teacher_logits, temperature).clamp(0.0, 1.0)


def agreement_masked_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """The generator's adversarial term of CMI and Fast (Fang et al., IJCAI 2021 / AAAI
    2022): ``mean_i [ 1(argmax s_i = argmax t_i) * KL(p_T,i || p_S,i) ]``. The generator
    *maximises* it (its loss is the negative): it seeks images the student still gets
    "right" but with a different belief, and leaves alone those it already gets wrong, so
    the images do not drift off the teacher's decision regions."""
    t = teacher_logits.float()
    s = student_logits.float()
    per_sample = F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), reduction="none", log_target=True).sum(1)
    agree = (s.argmax(1) == t.argmax(1)).float()
    return (per_sample * agree).mean()


def total_variation_l2(images: torch.Tensor) -> torch.Tensor:
    """DeepInversion's l2 total-variation prior: the sum of the Frobenius norms of the four
    neighbour differences (horizontal, vertical, and both diagonals) of the batch."""
    d1 = images[:, :, :, :-1] - images[:, :, :, 1:]
    d2 = images[:, :, :-1, :] - images[:, :, 1:, :]
    d3 = images[:, :, 1:, :-1] - images[:, :, :-1, 1:]
    d4 = images[:, :, :-1, :-1] - images[:, :, 1:, 1:]
    return d1.norm() + d2.norm() + d3.norm() + d4.norm()


def total_variation_l1(images: torch.Tensor) -> torch.Tensor:
    """DeepInversion's l1 total-variation prior: the sum over the same four neighbour
    differences of their mean absolute value."""
    d1 = images[:, :, :, :-1] - images[:, :, :, 1:]
    d2 = images[:, :, :-1, :] - images[:, :, 1:, :]
    d3 = images[:, :, 1:, :-1] - images[:, :, :-1, 1:]
    d4 = images[:, :, :-1, :-1] - images[:, :, 1:, 1:]
    return d1.abs().mean() + d2.abs().mean() + d3.abs().mean() + d4.abs().mean()


def l2_prior(images: torch.Tensor) -> torch.Tensor:
    """DeepInversion's l2 image prior: the Frobenius norm of the whole batch ``||x||_2``."""
    return images.norm()


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """Spatial attention map of Zagoruyko & Komodakis (ICLR 2017), ``p = 2``:
    ``a = normalize(mean_c f_c^2)`` flattened per sample (unit l2 norm)."""
    return F.normalize(features.float().pow(2).mean(dim=1).flatten(1), dim=1)


def attention_transfer_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Attention-transfer term as in ZSKT's code: ``mean (a_S - a_T)^2`` over batch and
    positions. Feature maps of different spatial size are matched by adaptive average pooling
    of the larger one."""
    if student_features.shape[-2:] != teacher_features.shape[-2:]:
        size = min(student_features.shape[-2], teacher_features.shape[-2]), min(
            student_features.shape[-1], teacher_features.shape[-1]
        )
        student_features = F.adaptive_avg_pool2d(student_features, size)
        teacher_features = F.adaptive_avg_pool2d(teacher_features, size)
    return (attention_map(student_features) - attention_map(teacher_features)).pow(2).mean()


def bn_statistics_loss(batch_mean: torch.Tensor, batch_var: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
    """DeepInversion's feature-distribution term for one BatchNorm layer:
    ``||mu(x) - mu_BN||_2 + ||sigma^2(x) - sigma^2_BN||_2`` (norms, not squared), with the
    batch variance taken biased, as BatchNorm does."""
    return (batch_mean - running_mean).norm() + (batch_var - running_var).norm()

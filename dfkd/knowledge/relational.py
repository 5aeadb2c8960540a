"""Relational knowledge: how the samples of a batch relate to each other in each network.

These losses compare ``B x B`` (or ``B x B x B``) structures, so a student and a teacher of
different widths need no adapter. Features are flattened per sample (``(B, ...) -> (B, D)``);
pass the penultimate embeddings (``layers = "embedding"``) unless a paper says otherwise.
Every loss needs a batch of at least two samples.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dfkd.knowledge.registry import Knowledge, flat, pairs, register_knowledge

__all__ = ["RKD", "SP", "PKT", "CC", "rkd_distance_loss", "rkd_angle_loss", "sp_loss", "pkt_loss", "cc_loss",
           "cc_kernel"]


def _check_batch(name: str, x: torch.Tensor) -> None:
    if x.shape[0] < 2:
        raise ValueError(f"{name}: a relational loss needs at least two samples per batch, got {x.shape[0]}")


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``d[i, j] = ||e_i - e_j||_2`` from the Gram matrix (no ``B x B x D`` tensor), with the
    squared distance clamped at ``eps`` before the square root (a finite gradient) and an
    exact zero diagonal."""
    sq = e.pow(2).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (e @ e.t())).clamp_min(eps)
    off = 1.0 - torch.eye(e.shape[0], device=e.device, dtype=e.dtype)
    return d2.sqrt() * off


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """RKD distance-wise term (Park et al., CVPR 2019, eq. 4-5).

    ``psi_D(x_i, x_j) = ||x_i - x_j||_2 / mu`` with ``mu`` the mean distance over the pairs
    ``i != j`` of the batch; the loss is the Huber (smooth-L1, delta = 1) difference of the two
    ``B x B`` matrices, averaged over all ``B^2`` entries as in the official code (the
    diagonal is zero in both). Invariant to scaling either network's embeddings."""
    s, t = flat(student), flat(teacher)
    _check_batch("rkd", s)
    n_pairs = s.shape[0] * (s.shape[0] - 1)
    ds, dt = pairwise_distances(s, eps), pairwise_distances(t, eps)
    ds = ds / (ds.sum() / n_pairs)
    dt = dt / (dt.sum() / n_pairs)
    return F.smooth_l1_loss(ds, dt)


def _angles(e: torch.Tensor) -> torch.Tensor:
    # a[v, i, k] = cos of the angle at vertex v between e_i and e_k (0 when i or k is v)
    d = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)
    return torch.bmm(d, d.transpose(1, 2))


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD angle-wise term (Park et al., CVPR 2019, eq. 6-7).

    ``psi_A(x_i, x_j, x_k) = <e_ij, e_kj>`` with ``e_ij = (x_i - x_j) / ||x_i - x_j||_2``, the
    cosine of the angle at ``x_j``; Huber (delta = 1) difference averaged over all ``B^3``
    triplets (degenerate ones, with a repeated index, are 0 in both networks), as in the
    official code. Builds a ``B x B x D`` tensor, like the official code."""
    s, t = flat(student), flat(teacher)
    _check_batch("rkd", s)
    return F.smooth_l1_loss(_angles(s), _angles(t))


@register_knowledge("rkd")
class RKD(Knowledge):
    """Relational knowledge distillation, Park, Kim, Lu & Cho, CVPR 2019, arXiv:1904.05068.

    ``L = w_D * L_dist + w_A * L_angle`` (see :func:`rkd_distance_loss`,
    :func:`rkd_angle_loss`), summed over the feature pairs. Defaults ``w_D = 25``,
    ``w_A = 50``: the weights the paper reports for its image-classification experiments,
    also RepDistiller's and mdistiller's (the paper's metric-learning runs weight the terms
    differently), so the loss enters the total with weight 1. Zero when the student's
    embeddings equal the teacher's up to a scale; no trainable parts.
    """

    layers = "embedding"
    suggested_weight = 1.0

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0, eps: float = 1e-12):
        super().__init__()
        self.distance_weight, self.angle_weight, self.eps = float(distance_weight), float(angle_weight), eps

    def forward(self, student_feats, teacher_feats, **kw) -> torch.Tensor:
        total = 0.0
        for s, t in pairs(self.name, student_feats, teacher_feats):
            if self.distance_weight:
                total = total + self.distance_weight * rkd_distance_loss(s, t, self.eps)
            if self.angle_weight:
                total = total + self.angle_weight * rkd_angle_loss(s, t)
        return total


def sp_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving term for one pair of activations (Tung & Mori, ICCV 2019, eq. 2-4).

    ``G = Q Q^T`` with ``Q`` the ``(B, D)`` flattened activations, each row of ``G`` divided by
    its l2 norm; ``L = ||G_T - G_S||_F^2 / B^2``. Invariant to scaling the activations and to
    any orthogonal change of the feature space shared by all samples (e.g. permuting the
    channels the same way in every sample), and unchanged when both batches are reordered the
    same way."""
    s, t = flat(student), flat(teacher)
    _check_batch("sp", s)
    gs = F.normalize(s @ s.t(), p=2, dim=1)
    gt = F.normalize(t @ t.t(), p=2, dim=1)
    return (gt - gs).pow(2).sum() / (s.shape[0] ** 2)


@register_knowledge("sp")
class SP(Knowledge):
    """Similarity-preserving knowledge distillation, Tung & Mori, ICCV 2019, arXiv:1907.09682.

    ``L = sum over pairs (l, l') of ||G_T^l - G_S^l'||_F^2 / B^2`` with row-normalised Gram
    matrices (:func:`sp_loss`); the paper pairs the outputs of the last block of each stage.
    Weight ``gamma = 3000`` in RepDistiller's and mdistiller's CIFAR-100 benchmarks.
    No trainable parts; widths of student and teacher may differ.
    """

    layers = "paired"
    suggested_weight = 3000.0

    def forward(self, student_feats, teacher_feats, **kw) -> torch.Tensor:
        return sum(sp_loss(s, t) for s, t in pairs(self.name, student_feats, teacher_feats))


def pkt_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7, exclude_self: bool = False) -> torch.Tensor:
    """Probabilistic knowledge transfer for one pair (Passalis & Tefas, ECCV 2018, eq. 9-13).

    Cosine kernel ``K(a, b) = (cos(a, b) + 1) / 2`` in ``[0, 1]``; conditional probabilities
    ``p_{j|i} = K(x_i, x_j) / sum_k K(x_i, x_k)`` (rows of the kernel matrix normalised);
    ``L = mean_{i,j} p^T_{j|i} log((p^T_{j|i} + eps) / (p^S_{j|i} + eps))`` with ``eps = 1e-7``,
    the reduction of the authors' code (a mean over the ``B^2`` entries). The authors' code
    keeps ``k = i`` in the sums; the paper's formula leaves it out: ``exclude_self=True``."""
    s, t = flat(student), flat(teacher)
    _check_batch("pkt", s)
    s = s / (s.norm(dim=1, keepdim=True) + eps)
    t = t / (t.norm(dim=1, keepdim=True) + eps)
    ks = (s @ s.t() + 1.0) / 2.0
    kt = (t @ t.t() + 1.0) / 2.0
    if exclude_self:
        off = 1.0 - torch.eye(s.shape[0], device=s.device, dtype=s.dtype)
        ks, kt = ks * off, kt * off
    ps = ks / ks.sum(dim=1, keepdim=True)
    pt = kt / kt.sum(dim=1, keepdim=True)
    return (pt * torch.log((pt + eps) / (ps + eps))).mean()


@register_knowledge("pkt")
class PKT(Knowledge):
    """Probabilistic knowledge transfer, Passalis & Tefas, ECCV 2018, arXiv:1803.10837.

    KL divergence between the teacher's and the student's conditional probability
    distributions built from cosine-similarity kernels (:func:`pkt_loss`), summed over pairs.
    Weight 30000 in RepDistiller's and mdistiller's CIFAR-100 benchmarks (their PKT is the
    authors' code, whose mean reduction makes the raw value small). Invariant to the scale of
    each sample's features; no trainable parts.
    """

    layers = "embedding"
    suggested_weight = 30000.0

    def __init__(self, eps: float = 1e-7, exclude_self: bool = False):
        super().__init__()
        self.eps, self.exclude_self = eps, bool(exclude_self)

    def forward(self, student_feats, teacher_feats, **kw) -> torch.Tensor:
        return sum(pkt_loss(s, t, self.eps, self.exclude_self) for s, t in pairs(self.name, student_feats, teacher_feats))


def cc_kernel(x: torch.Tensor, gamma: float = 0.4, order: int = 2) -> torch.Tensor:
    """CCKD's correlation matrix: the Gaussian RBF ``k(a, b) = exp(-gamma ||a - b||^2)`` of the
    l2-normalised features, approximated by its ``order``-P Taylor expansion. For unit vectors
    ``||a - b||^2 = 2 - 2 a.b``, so ``k = exp(-2 gamma) exp(2 gamma a.b)``
    ``~ sum_{p=0..P} exp(-2 gamma) (2 gamma)^p / p! * (a.b)^p``."""
    f = F.normalize(flat(x), p=2, dim=1)
    sim = f @ f.t()
    out = torch.zeros_like(sim)
    for p in range(order + 1):
        out = out + math.exp(-2.0 * gamma) * (2.0 * gamma) ** p / math.factorial(p) * sim.pow(p)
    return out


def cc_loss(student: torch.Tensor, teacher: torch.Tensor, gamma: float = 0.4, order: int = 2) -> torch.Tensor:
    """Correlation congruence for one pair: ``L_CC = ||psi(F_T) - psi(F_S)||_2^2 / B^2`` with
    ``psi`` the ``B x B`` kernel matrix of :func:`cc_kernel` (Peng et al., ICCV 2019, eq. 5-10)."""
    _check_batch("cc", student)
    return (cc_kernel(student, gamma, order) - cc_kernel(teacher, gamma, order)).pow(2).mean()


@register_knowledge("cc")
class CC(Knowledge):
    """Correlation congruence, Peng, Jin, Liu, Zhou, Wu, Liu, Li & Zhang, ICCV 2019,
    arXiv:1904.01802.

    Matches the sample-to-sample correlation matrices of the two embeddings under a Gaussian
    RBF kernel approximated by a P-order Taylor series (:func:`cc_loss`), summed over pairs.
    Defaults ``P = 2`` and ``gamma = 0.4``: those of the widely used reimplementation of the
    paper's Gaussian-RBF variant (AberHu's Knowledge-Distillation-Zoo); the paper's own text
    was not at hand when this was written, so check its Section 4 before quoting them as the
    paper's. The paper adds CC to instance-level KD with a per-task weight, so none is
    suggested here. RepDistiller's "CC" is a different, simplified loss (not this one).
    No trainable parts.
    """

    layers = "embedding"

    def __init__(self, gamma: float = 0.4, order: int = 2):
        super().__init__()
        if order < 0:
            raise ValueError(f"cc: the Taylor order must be >= 0, got {order}")
        self.gamma, self.order = float(gamma), int(order)

    def forward(self, student_feats, teacher_feats, **kw) -> torch.Tensor:
        return sum(cc_loss(s, t, self.gamma, self.order) for s, t in pairs(self.name, student_feats, teacher_feats))

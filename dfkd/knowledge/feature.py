"""Feature knowledge: what the intermediate feature maps of the teacher hold.

FSP and NST compare statistics of the maps and have no trainable parts (FSP gets 1x1
adapters only where channel counts differ); FT and VID learn small networks (paraphraser and
translator; regressor and variances) that an engine optimises with the student through
:meth:`~dfkd.knowledge.registry.Knowledge.extra_parameters`. Maps of different spatial size
are matched by adaptive average pooling of the larger one (RepDistiller's convention).
``(B, C)`` vectors are treated as ``(B, C, 1, 1)`` maps where a loss allows it.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.knowledge.registry import Knowledge, as_list, as_map, channels, flat, match_spatial, pairs, register_knowledge

__all__ = ["FSP", "NST", "FactorTransfer", "VID", "fsp_matrix", "nst_loss", "Paraphraser", "Translator"]


def _check_channels(name: str, given: Sequence[int] | None, feats: Sequence[torch.Tensor], side: str) -> None:
    if given is not None and list(given) != channels(feats):
        raise ValueError(f"{name}: built for {side} channels {list(given)}, got features with {channels(feats)}")


def fsp_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The FSP ("flow of solution procedure") matrix of two maps of one network:
    ``G[i, j] = sum_{h,w} a[i, h, w] * b[j, h, w] / (h * w)``, shape ``(B, C_a, C_b)``; maps of
    different resolution are pooled to the smaller one first."""
    a, b = match_spatial(as_map(a).float(), as_map(b).float())
    return torch.einsum("bihw,bjhw->bij", a, b) / (a.shape[-2] * a.shape[-1])


@register_knowledge("fsp")
class FSP(Knowledge):
    """Flow of solution procedure, Yim, Joo, Bae & Kim, CVPR 2017 ("A Gift from Knowledge
    Distillation: Fast Optimization, Network Minimization and Transfer Learning"; no arXiv
    version).

    ``L = 1/N sum_x sum_i lambda_i ||G_i^T(x) - G_i^S(x)||_2^2`` where ``G_i`` is the
    :func:`fsp_matrix` between the i-th and (i+1)-th entries of each network's feature list
    (``layers = "sequence"``: e.g. the stem output and each stage's output, so that every
    flow spans one stage as in the paper), the norm is the squared Frobenius norm (a sum over
    the matrix), ``N`` the batch size and all ``lambda_i = 1`` (the paper's equal weights).
    In the paper FSP is a first training stage (minimise it alone, then train the task).

    The paper pairs layers with equal channel counts. Where they differ, a 1x1 convolution
    (no bias) maps the student's map to the teacher's channels (an extension); these adapters
    are built from ``student_channels``/``teacher_channels`` when both are given, else
    lazily from the first batch. Zero when student and teacher maps are equal.
    """

    layers = "sequence"
    suggested_weight = None

    def __init__(self, student_channels: Sequence[int] | None = None, teacher_channels: Sequence[int] | None = None):
        super().__init__()
        self.student_channels = None if student_channels is None else [int(c) for c in student_channels]
        self.teacher_channels = None if teacher_channels is None else [int(c) for c in teacher_channels]
        self.adapters = nn.ModuleDict()
        if self.student_channels is not None and self.teacher_channels is not None:
            self._build(self.student_channels, self.teacher_channels)
        else:
            self._pending = True

    def _build(self, cs: list[int], ct: list[int], device=None) -> None:
        if len(cs) != len(ct):
            raise ValueError(f"fsp: {len(cs)} student and {len(ct)} teacher layers")
        for i, (a, b) in enumerate(zip(cs, ct)):
            if a != b:
                self.adapters[str(i)] = nn.Conv2d(a, b, kernel_size=1, bias=False).to(device)
        self.student_channels, self.teacher_channels, self._pending = cs, ct, False

    def forward(self, student_feats, teacher_feats, **kw) -> torch.Tensor:
        s, t = as_list(student_feats), as_list(teacher_feats)
        pairs(self.name, s, t)
        if len(s) < 2:
            raise ValueError("fsp: needs at least two layers per network (flows run between consecutive layers)")
        if self._pending:
            self._build(channels(s), channels(t), s[0].device)
        _check_channels(self.name, self.student_channels, s, "student")
        _check_channels(self.name, self.teacher_channels, t, "teacher")
        s = [self.adapters[str(i)](as_map(x).float()) if str(i) in self.adapters else x for i, x in enumerate(s)]
        total = 0.0
        for i in range(len(s) - 1):
            gs, gt = fsp_matrix(s[i], s[i + 1]), fsp_matrix(t[i], t[i + 1])
            total = total + (gs - gt).pow(2).sum(dim=(1, 2)).mean()
        return total


def nst_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Squared MMD between the student's and the teacher's channel distributions, polynomial
    kernel ``k(x, y) = (x.y + c)^d`` with ``d = 2``, ``c = 0``:

    ``L = 1/C_T^2 sum_{i,i'} k(f_T^i, f_T^i') + 1/C_S^2 sum_{j,j'} k(f_S^j, f_S^j')
    - 2/(C_T C_S) sum_{i,j} k(f_T^i, f_S^j)``

    where ``f^i`` is channel ``i``'s map flattened over positions and l2-normalised; averaged
    over the batch. Channel counts may differ; resolutions are matched by pooling."""
    if student.dim() < 3 or teacher.dim() < 3:
        raise ValueError("nst: needs feature maps (B, C, H, W) or (B, C, L), not vectors")
    student, teacher = match_spatial(student.float(), teacher.float())
    fs = F.normalize(student.flatten(2), p=2, dim=2)
    ft = F.normalize(teacher.flatten(2), p=2, dim=2)

    def k(a, b):
        return torch.bmm(a, b.transpose(1, 2)).pow(2).mean(dim=(1, 2))

    return (k(ft, ft) + k(fs, fs) - 2.0 * k(fs, ft)).mean()


@register_knowledge("nst")
class NST(Knowledge):
    """Neuron selectivity transfer, Huang & Wang, 2017 ("Like What You Like: Knowledge Distill
    via Neuron Selectivity Transfer"), arXiv:1707.01219.

    MMD between the distributions of the two networks' normalised channel activations with
    the paper's polynomial kernel ``d = 2, c = 0`` (:func:`nst_loss`), summed over pairs.
    Weight 50 in RepDistiller's and mdistiller's CIFAR-100 benchmarks. Invariant to the order
    of the channels and to a positive scale of each channel. No trainable parts.
    """

    layers = "paired"
    suggested_weight = 50.0

    def forward(self, student_feats, teacher_feats, **kw) -> torch.Tensor:
        return sum(nst_loss(s, t) for s, t in pairs(self.name, student_feats, teacher_feats))


def _conv_block(conv: type, c_in: int, c_out: int, use_bn: bool) -> list[nn.Module]:
    return [conv(c_in, c_out, 3, 1, 1, bias=not use_bn), nn.BatchNorm2d(c_out) if use_bn else nn.Identity(),
            nn.LeakyReLU(0.1)]


class Paraphraser(nn.Module):
    """FT's paraphraser: an auto-encoder of the teacher's map, ``C -> C -> kC -> kC`` with 3x3
    convolutions (encoder, whose output is the *teacher factor*) and back with 3x3 transposed
    convolutions (decoder), each followed by BatchNorm and LeakyReLU(0.1), as in the paper's
    appendix and the authors' code."""

    def __init__(self, c: int, rate: float = 0.5, use_bn: bool = True):
        super().__init__()
        k = max(1, int(c * rate))
        self.encoder = nn.Sequential(*_conv_block(nn.Conv2d, c, c, use_bn), *_conv_block(nn.Conv2d, c, k, use_bn),
                                     *_conv_block(nn.Conv2d, k, k, use_bn))
        self.decoder = nn.Sequential(*_conv_block(nn.ConvTranspose2d, k, k, use_bn),
                                     *_conv_block(nn.ConvTranspose2d, k, c, use_bn),
                                     *_conv_block(nn.ConvTranspose2d, c, c, use_bn))

    def forward(self, x):
        factor = self.encoder(x)
        return factor, self.decoder(factor)


class Translator(nn.Module):
    """FT's translator: the student's map to a factor of the teacher factor's size,
    ``C_s -> C_s -> kC_t -> kC_t`` with 3x3 convolutions, BatchNorm and LeakyReLU(0.1)."""

    def __init__(self, c_student: int, c_teacher: int, rate: float = 0.5, use_bn: bool = True):
        super().__init__()
        k = max(1, int(c_teacher * rate))
        self.net = nn.Sequential(*_conv_block(nn.Conv2d, c_student, c_student, use_bn),
                                 *_conv_block(nn.Conv2d, c_student, k, use_bn), *_conv_block(nn.Conv2d, k, k, use_bn))

    def forward(self, x):
        return self.net(x)


@register_knowledge("ft")
class FactorTransfer(Knowledge):
    """Factor transfer, Kim, Park & Kwak, NeurIPS 2018 ("Paraphrasing Complex Network: Network
    Compression via Factor Transfer"), arXiv:1802.04977.

    ``L_FT = || F_T / ||F_T||_2 - F_S / ||F_S||_2 ||_p`` with ``p = 1`` (the paper's choice),
    ``F_T = paraphraser.encoder(teacher map)`` and ``F_S = translator(student map)``, both
    flattened per sample; as in the authors' code the norm is averaged over batch and
    elements (``F.l1_loss``). Paraphrase rate ``k = 0.5`` (the paper's CIFAR setting). The
    paper applies FT to the last stage's output; several pairs are summed here. Weight 200 in
    RepDistiller's CIFAR-100 benchmark.

    Two stages, as in the paper:

    1. **Paraphraser pre-training** (unsupervised, teacher only): minimise
       :meth:`reconstruction_loss` (``||x - P(x)||^2``, mean squared error) over
       :meth:`paraphraser_parameters` on teacher features -- in data-free work, those of
       synthetic batches. RepDistiller does this for 30 epochs. Then call
       :meth:`freeze_paraphraser` (no gradient, eval mode from then on).
    2. **Student training**: ``forward`` gives ``L_FT``; :meth:`extra_parameters` returns the
       translators' parameters only (the paraphraser stays fixed).

    Paraphrasers and translators are built from ``student_channels``/``teacher_channels``
    when given, else lazily (paraphrasers from the first teacher batch, translators from the
    first student batch).
    """

    layers = "paired"
    suggested_weight = 200.0

    def __init__(self, student_channels: Sequence[int] | None = None, teacher_channels: Sequence[int] | None = None,
                 rate: float = 0.5, p: int = 1, use_bn: bool = True):
        super().__init__()
        if p not in (1, 2):
            raise ValueError(f"ft: p must be 1 or 2, got {p}")
        self.rate, self.p, self.use_bn = float(rate), int(p), bool(use_bn)
        self.paraphrasers = nn.ModuleList()
        self.translators = nn.ModuleList()
        self.teacher_channels = None if teacher_channels is None else [int(c) for c in teacher_channels]
        self.student_channels = None if student_channels is None else [int(c) for c in student_channels]
        self.frozen = False
        if self.teacher_channels is not None:
            self._build_paraphrasers(self.teacher_channels)
        if self.student_channels is not None and self.teacher_channels is not None:
            self._build_translators(self.student_channels)
        self._pending = len(self.translators) == 0

    def _build_paraphrasers(self, ct: list[int], device=None) -> None:
        self.paraphrasers.extend(Paraphraser(c, self.rate, self.use_bn).to(device) for c in ct)
        self.teacher_channels = ct

    def _build_translators(self, cs: list[int], device=None) -> None:
        if len(cs) != len(self.teacher_channels):
            raise ValueError(f"ft: {len(cs)} student and {len(self.teacher_channels)} teacher layers")
        self.translators.extend(Translator(a, b, self.rate, self.use_bn).to(device)
                                for a, b in zip(cs, self.teacher_channels))
        self.student_channels, self._pending = cs, False

    def _teacher_maps(self, teacher_feats) -> list[torch.Tensor]:
        t = [as_map(x).float() for x in as_list(teacher_feats)]
        if not self.paraphrasers:
            self._build_paraphrasers(channels(t), t[0].device)
        _check_channels(self.name, self.teacher_channels, t, "teacher")
        return t

    def reconstruction_loss(self, teacher_feats) -> torch.Tensor:
        """Stage 1: ``sum over layers of mean (P(x) - x)^2``, the paraphraser's objective."""
        t = self._teacher_maps(teacher_feats)
        return sum(F.mse_loss(para(x)[1], x) for para, x in zip(self.paraphrasers, t))

    def paraphraser_parameters(self) -> list[nn.Parameter]:
        """The paraphrasers' parameters, for stage 1 (build them first: give teacher channels
        or call :meth:`reconstruction_loss` once)."""
        return [p for p in self.paraphrasers.parameters() if p.requires_grad]

    def freeze_paraphraser(self) -> "FactorTransfer":
        """End of stage 1: the paraphrasers get no gradient and stay in eval mode."""
        self.paraphrasers.requires_grad_(False).eval()
        self.frozen = True
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.paraphrasers.eval()
        return self

    def extra_parameters(self) -> list[nn.Parameter]:
        super().extra_parameters()  # refuses while the translators are unbuilt
        return [p for p in self.translators.parameters() if p.requires_grad]

    def forward(self, student_feats, teacher_feats, **kw) -> torch.Tensor:
        s = [as_map(x).float() for x in as_list(student_feats)]
        t = self._teacher_maps(teacher_feats)
        pairs(self.name, s, t)
        if self._pending:
            self._build_translators(channels(s), s[0].device)
        _check_channels(self.name, self.student_channels, s, "student")
        total = 0.0
        for para, trans, a, b in zip(self.paraphrasers, self.translators, s, t):
            a, b = match_spatial(a, b)
            fs = F.normalize(flat(trans(a)), p=2, dim=1)
            ft = F.normalize(flat(para.encoder(b)), p=2, dim=1)
            total = total + (F.l1_loss(fs, ft) if self.p == 1 else F.mse_loss(fs, ft))
        return total


class _VIDHead(nn.Module):
    def __init__(self, c_in: int, c_mid: int, c_out: int, init_variance: float, eps: float):
        super().__init__()
        self.regressor = nn.Sequential(nn.Conv2d(c_in, c_mid, 1, bias=False), nn.ReLU(),
                                       nn.Conv2d(c_mid, c_mid, 1, bias=False), nn.ReLU(),
                                       nn.Conv2d(c_mid, c_out, 1, bias=False))
        # softplus(alpha) + eps == init_variance at the start
        alpha = math.log(math.expm1(init_variance - eps))
        self.alpha = nn.Parameter(torch.full((c_out,), alpha))


@register_knowledge("vid")
class VID(Knowledge):
    """Variational information distillation, Ahn, Hu, Damianou, Lawrence & Dai, CVPR 2019,
    arXiv:1904.05835.

    Maximises a variational lower bound on the mutual information between teacher and
    student features with a Gaussian ``q(t | s) = N(t; mu(s), sigma^2)`` whose mean is a
    regressor of the student's map and whose variance is heteroscedastic over channels and
    constant over positions: ``sigma_c^2 = softplus(alpha_c) + eps``. The loss is the negative
    log-likelihood without its constant,

    ``L = mean_{b,c,h,w} [ log sigma_c^2 / 2 + (t_{b,c,h,w} - mu_{b,c,h,w}(s))^2 / (2 sigma_c^2) ]``

    (a mean rather than the paper's sum over channels and positions, as in the authors'
    code), summed over pairs. ``mu`` is three 1x1 convolutions ``C_s -> C_mid -> C_mid -> C_t``
    with ReLU between (``C_mid = C_t`` by default, as in RepDistiller); ``sigma^2`` starts at
    ``init_variance = 5.0`` with ``eps = 1e-5`` (the authors' code). Weight 1 in RepDistiller's
    benchmark. Regressors and variances are built from ``student_channels``/
    ``teacher_channels`` when given, else from the first batch; they are trained with the
    student (:meth:`extra_parameters`).
    """

    layers = "paired"
    suggested_weight = 1.0

    def __init__(self, student_channels: Sequence[int] | None = None, teacher_channels: Sequence[int] | None = None,
                 mid_channels: int | None = None, init_variance: float = 5.0, eps: float = 1e-5):
        super().__init__()
        if init_variance <= eps:
            raise ValueError(f"vid: init_variance must exceed eps, got {init_variance} and {eps}")
        self.mid_channels, self.init_variance, self.eps = mid_channels, float(init_variance), float(eps)
        self.heads = nn.ModuleList()
        self.student_channels = self.teacher_channels = None
        if student_channels is not None and teacher_channels is not None:
            self._build([int(c) for c in student_channels], [int(c) for c in teacher_channels])
        else:
            self._pending = True

    def _build(self, cs: list[int], ct: list[int], device=None) -> None:
        if len(cs) != len(ct):
            raise ValueError(f"vid: {len(cs)} student and {len(ct)} teacher layers")
        self.heads.extend(_VIDHead(a, self.mid_channels or b, b, self.init_variance, self.eps).to(device)
                          for a, b in zip(cs, ct))
        self.student_channels, self.teacher_channels, self._pending = cs, ct, False

    def variances(self) -> list[torch.Tensor]:
        """``sigma_c^2`` of each pair."""
        return [F.softplus(h.alpha) + self.eps for h in self.heads]

    def forward(self, student_feats, teacher_feats, **kw) -> torch.Tensor:
        s = [as_map(x).float() for x in as_list(student_feats)]
        t = [as_map(x).float() for x in as_list(teacher_feats)]
        pairs(self.name, s, t)
        if self._pending:
            self._build(channels(s), channels(t), s[0].device)
        _check_channels(self.name, self.student_channels, s, "student")
        _check_channels(self.name, self.teacher_channels, t, "teacher")
        total = 0.0
        for head, var, a, b in zip(self.heads, self.variances(), s, t):
            a, b = match_spatial(a, b)
            mu = head.regressor(a)
            var = var.view(1, -1, 1, 1)
            total = total + (0.5 * (torch.log(var) + (b - mu).pow(2) / var)).mean()
        return total

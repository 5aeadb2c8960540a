"""The registered combiners: from plain averages to UHC (formulas in each class's docstring).

Shared conventions (shapes, masks, merged logits) are in :mod:`dfkd.multi.combine`.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
import torch.nn.functional as F

from dfkd.core.losses import kd_loss
from dfkd.multi.combine import (
    Combiner,
    CombinerWarning,
    check_logits,
    component_listing,
    create_combiner,
    floored_log,
    masked_mean_logits,
    masked_softmax,
    member_components,
    mixture,
    register_combiner,
    teacher_entropies,
)


@register_combiner("mean_prob")
class MeanProb(Combiner):
    """Mean of the teachers' probabilities (the classic ensemble average):

    ``p(k) = 1/T sum_t p_t(k)``; returns ``log p``.

    For teachers with partial class sets ``p_t(k) = 0`` outside ``C_t``, so each teacher's
    classes receive total mass ``1/T`` whatever the input; for disjoint class sets prefer
    ``concat``, ``entropy_weighted``, ``least_ambiguous`` or the UHC loss.
    """

    def forward(self, logits, mask):
        logits, mask = check_logits(logits, mask)
        probs = masked_softmax(logits, mask)
        return floored_log(probs.mean(dim=0))


@register_combiner("mean_logits")
class MeanLogits(Combiner):
    """Mean of the logits over the teachers that know each class:

    ``z(k) = sum_{t: k in C_t} z_t(k) / |{t: k in C_t}|``.

    With one shared label space this is the plain logit average (a geometric mean of the
    probabilities, renormalised); for disjoint class sets it reduces to ``concat``. Raw logit
    scales of different teachers are compared as they are (no calibration).
    """

    def forward(self, logits, mask):
        logits, mask = check_logits(logits, mask)
        return masked_mean_logits(logits, mask)


@register_combiner("weighted")
class Weighted(Combiner):
    """Fixed-weight mixture of probabilities: ``p = sum_t w_t p_t`` with
    ``w = weights / sum(weights)`` (non-negative, one per teacher); returns ``log p``.

    ``weights=None`` means equal weights (then identical to ``mean_prob``).
    """

    def __init__(self, weights: Sequence[float] | None = None):
        super().__init__()
        self.weights = None if weights is None else [float(w) for w in weights]
        if self.weights is not None and (any(w < 0 for w in self.weights) or sum(self.weights) <= 0):
            raise ValueError(f"weighted: weights must be non-negative with a positive sum, got {self.weights}")
        w = torch.tensor(self.weights or [], dtype=torch.float32)
        self.register_buffer("normalized_weights", w / w.sum() if self.weights else w, persistent=False)

    def check_mask(self, mask, names=None):
        super().check_mask(mask, names)
        if self.weights is not None and len(self.weights) != mask.shape[0]:
            raise ValueError(f"weighted: {len(self.weights)} weights given for {mask.shape[0]} teachers")

    def describe(self):
        return {"weights": self.weights}

    def forward(self, logits, mask):
        logits, mask = check_logits(logits, mask)
        n = logits.shape[0]
        if self.weights is None:
            w = torch.full((n,), 1.0 / n, device=logits.device)
        else:
            if len(self.weights) != n:
                raise ValueError(f"weighted: {len(self.weights)} weights given for {n} teachers")
            w = self.normalized_weights.to(logits.device)
        return floored_log(mixture(masked_softmax(logits, mask), w))


@register_combiner("entropy_weighted")
class EntropyWeighted(Combiner):
    """Per-sample confidence weighting by entropy:

    ``w_t(x) = softmax_t(-H_t(x) / tau)`` (so ``w_t oc exp(-H_t / tau)``), ``p = sum_t w_t p_t``;
    returns ``log p``.

    Confident (low-entropy) teachers dominate; ``tau -> 0`` approaches ``least_ambiguous``,
    ``tau -> inf`` approaches ``mean_prob``. With ``normalize=True`` entropies are divided by
    ``log |C_t|`` so that teachers of different class counts are comparable. A soft version of
    the teacher selection of Shen et al., ICCV 2019 ("Customizing student networks from
    heterogeneous teachers via adaptive knowledge amalgamation").
    """

    def __init__(self, tau: float = 1.0, normalize: bool = False):
        super().__init__()
        if tau <= 0:
            raise ValueError(f"entropy_weighted: tau must be positive, got {tau}")
        self.tau, self.normalize = float(tau), bool(normalize)

    def describe(self):
        return {"tau": self.tau, "normalize": self.normalize}

    def weights(self, probs, mask):
        return torch.softmax(-teacher_entropies(probs, self.normalize, mask) / self.tau, dim=0)

    def forward(self, logits, mask):
        logits, mask = check_logits(logits, mask)
        probs = masked_softmax(logits, mask)
        return floored_log(mixture(probs, self.weights(probs, mask)))


@register_combiner("least_ambiguous")
class LeastAmbiguous(Combiner):
    """Per-sample selection of the least ambiguous teacher (Shen et al., ICCV 2019,
    "Customizing student networks from heterogeneous teachers via adaptive knowledge
    amalgamation"): ``t*(x) = argmin_t H_t(x)`` and ``p = p_{t*}`` placed in the union;
    returns ``log p`` (classes outside ``C_{t*}`` get ``log 1e-8``). ``normalize`` as in
    ``entropy_weighted``; ties go to the first teacher.
    """

    def __init__(self, normalize: bool = False):
        super().__init__()
        self.normalize = bool(normalize)

    def describe(self):
        return {"normalize": self.normalize}

    def selection(self, probs, mask) -> torch.Tensor:
        """Index of the chosen teacher for every sample: ``(B,)``."""
        return teacher_entropies(probs, self.normalize, mask).argmin(dim=0)

    def forward(self, logits, mask):
        logits, mask = check_logits(logits, mask)
        probs = masked_softmax(logits, mask)
        pick = self.selection(probs, mask)
        chosen = probs.gather(0, pick[None, :, None].expand(1, *probs.shape[1:]))[0]
        return floored_log(chosen)


@register_combiner("noisy")
class Noisy(Combiner):
    """Noisy teachers (Sau & Balasubramanian, 2016, "Deep model compression: distilling
    knowledge from noisy teachers", arXiv:1610.09650).

    In training mode each teacher's logits are perturbed as in the paper,
    ``z'_t = z_t (1 + xi)`` with ``xi ~ N(0, sigma^2)`` drawn per logit (``additive=True``:
    ``z'_t = z_t + xi``), with probability ``p`` per sample (the paper's ``alpha``), and
    then merged by the ``base`` combiner (default ``mean_logits``). In eval mode the base
    combiner sees the clean logits. Noise uses torch's global generator (seeded by ``--seed``).
    """

    def __init__(self, sigma: float = 0.1, p: float = 1.0, additive: bool = False, base: str = "mean_logits"):
        super().__init__()
        if sigma < 0 or not 0.0 <= p <= 1.0:
            raise ValueError(f"noisy: need sigma >= 0 and 0 <= p <= 1, got sigma={sigma}, p={p}")
        if base == "noisy":
            raise ValueError("noisy: base cannot be 'noisy'")
        self.sigma, self.p, self.additive, self.base_name = float(sigma), float(p), bool(additive), base
        self.base = create_combiner(base)

    def describe(self):
        return {"sigma": self.sigma, "p": self.p, "additive": self.additive, "base": self.base_name}

    def perturb(self, logits: torch.Tensor) -> torch.Tensor:
        xi = torch.randn(logits.shape, device=logits.device) * self.sigma
        if self.p < 1.0:
            xi = xi * (torch.rand(1, logits.shape[1], 1, device=logits.device) < self.p)
        return logits + xi if self.additive else logits * (1.0 + xi)

    def forward(self, logits, mask):
        logits, mask = check_logits(logits, mask)
        if self.training and self.sigma > 0:
            logits = self.perturb(logits)
        return self.base(logits, mask)


@register_combiner("pate")
class PATE(Combiner):
    """Noisy-max aggregation of teacher votes (Papernot et al., ICLR 2017, "Semi-supervised
    knowledge transfer for deep learning from private training data").

    Each teacher votes for its arg-max class; ``n_k(x)`` counts the votes for union class
    ``k``. In training mode the winner is ``argmax_k n_k(x) + Lap(1/epsilon)``; in eval mode
    the plain majority (ties -- only possible without noise -- go to the class of highest
    mean probability). The target is one-hot: returns ``log(onehot)`` floored at ``log 1e-8``,
    so KD against it is the cross-entropy with the winning label (at T = 1).
    """

    def __init__(self, epsilon: float = 1.0):
        super().__init__()
        if epsilon <= 0:
            raise ValueError(f"pate: epsilon must be positive, got {epsilon}")
        self.epsilon = float(epsilon)

    def describe(self):
        return {"epsilon": self.epsilon}

    def votes(self, logits, mask) -> torch.Tensor:
        """Vote counts ``n_k(x)``: ``(B, K)``."""
        probs = masked_softmax(logits, mask)
        winners = probs.argmax(dim=-1)  # (T, B) -- always a known class
        return F.one_hot(winners, logits.shape[-1]).sum(dim=0).float()

    def forward(self, logits, mask):
        logits, mask = check_logits(logits, mask)
        counts = self.votes(logits, mask)
        if self.training:
            zero = counts.new_zeros(())
            noise = torch.distributions.Laplace(zero, zero + 1.0 / self.epsilon).sample(counts.shape)
            score = counts + noise
        else:
            score = counts + 1e-3 * masked_softmax(logits, mask).mean(dim=0)
        onehot = F.one_hot(score.argmax(dim=1), counts.shape[1]).float()
        return floored_log(onehot)


# ----------------------------------------------------------------------------- different class sets
@register_combiner("concat")
class Concat(Combiner):
    """Disjoint class sets by concatenation (Shen et al., AAAI 2019, "Amalgamating knowledge
    towards comprehensive classification"): ``z(k) = z_t(k)`` for the unique teacher ``t``
    that knows ``k``, i.e. the teachers' score vectors concatenated in union order.

    Overlapping class sets are an error (use ``mean_logits`` or the UHC loss).
    """

    def check_mask(self, mask, names=None):
        super().check_mask(mask, names)
        owners = mask.bool().sum(dim=0)
        if bool((owners > 1).any()):
            shared = torch.nonzero(owners > 1).flatten().tolist()
            raise ValueError(f"concat needs disjoint class sets, but union classes {shared} are known by several "
                             "teachers; use calibrated_concat, mean_logits, entropy_weighted or uhc")

    def forward(self, logits, mask):
        if mask.device.type == "cpu":
            self.check_mask(mask)
        logits, mask = check_logits(logits, mask)
        return (logits * mask[:, None, :].float()).sum(dim=0)


def uhc_loss(student_logits: torch.Tensor, teacher_logits_list: Sequence[torch.Tensor],
             teacher_class_indices: Sequence[torch.Tensor | Sequence[int]], temperature: float = 1.0) -> torch.Tensor:
    """Unifying heterogeneous classifiers (Vongkulbhisal et al., CVPR 2019, "Unifying
    heterogeneous classifiers with distillation").

    For teacher ``t`` with union classes ``C_t`` (``teacher_class_indices[t]``, aligned with
    the columns of ``teacher_logits_list[t]``)::

        q_t   = softmax(z_t / T)                                  over C_t
        phat_t(k) = p_S(k) / sum_{j in C_t} p_S(j) = softmax(s[C_t] / T)(k)
        L_UHC = T^2 * 1/|teachers| * sum_t  mean_batch  KL(q_t || phat_t)

    i.e. the student's distribution *renormalised over each teacher's classes* is matched to
    that teacher. We average over teachers (the paper sums; the average keeps the scale of a
    single KD term). KL differs from the paper's cross-entropy by the teachers' entropies, a
    constant, so the gradients are the same. Overlapping classes need no calibration.
    """
    if len(teacher_logits_list) != len(teacher_class_indices) or not teacher_logits_list:
        raise ValueError("uhc_loss needs one class-index list per teacher (and at least one teacher)")
    s = student_logits.float()
    total = s.new_zeros(())
    for z, idx in zip(teacher_logits_list, teacher_class_indices):
        idx = torch.as_tensor(idx, dtype=torch.long, device=s.device)
        if z.shape[1] != idx.numel():
            raise ValueError(f"uhc_loss: teacher logits have {z.shape[1]} columns but {idx.numel()} class indices")
        total = total + kd_loss(s.index_select(1, idx), z.float().detach(), temperature)
    return total / len(teacher_logits_list)


@register_combiner("uhc")
class UHC(Combiner):
    """The UHC student loss (:func:`uhc_loss`) as a combiner.

    ``loss()`` is :func:`uhc_loss` on the teachers' own classes. ``forward()`` -- used only
    where one merged prediction is needed (the ensemble's own predictions, the generator
    steps of the synthesizers) -- is the mean over teachers of their log-probabilities,
    ``z(k) = mean_{t: k in C_t} log p_t(k)``, which removes each teacher's arbitrary logit
    offset.

    UHC learns how much probability belongs to each member only through the classes members
    share: on members whose class sets do not connect (two disjoint halves), every term is
    the same however the student splits its mass between them, so :meth:`check_mask` warns
    (:class:`~dfkd.multi.combine.CombinerWarning`) and names ``calibrated_concat`` instead.
    """

    def check_mask(self, mask, names=None):
        super().check_mask(mask, names)
        components = member_components(mask)
        if len(components) > 1:
            warnings.warn(
                f"uhc: the class sets of the members {component_listing(components, names)} do not overlap, so UHC cannot learn "
                "how much probability belongs to each of these groups (its loss is the same however the student splits "
                "its mass between them); use --combine calibrated_concat (or group_share, or auto)",
                CombinerWarning, stacklevel=2)

    def forward(self, logits, mask):
        logits, mask = check_logits(logits, mask)
        return masked_mean_logits(floored_log(masked_softmax(logits, mask)), mask)

    def loss(self, student_logits, logits, mask, temperature=1.0, merged=None):
        """:func:`uhc_loss` computed with masks (all teachers at once, no host synchronisation)."""
        logits, mask = check_logits(logits, mask)
        m = mask[:, None, :]
        q = masked_softmax(logits.detach() / temperature, mask)  # (T, B, K)
        s = (student_logits.float() / temperature)[None].expand_as(q)
        log_p = torch.log_softmax(s.masked_fill(~m, float("-inf")), dim=-1)
        log_q = q.clamp_min(1e-12).log()
        kl = torch.where(m, q * (log_q - log_p.masked_fill(~m, 0.0)), torch.zeros_like(q)).sum(dim=-1)  # (T, B)
        return kl.mean(dim=1).mean() * temperature**2

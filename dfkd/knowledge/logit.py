"""Logit knowledge beyond plain KD (:func:`dfkd.core.losses.kd_loss`): decoupled KD."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dfkd.knowledge.registry import Knowledge, register_knowledge

__all__ = ["DKD", "dkd_terms"]

_MASKED = -1e9  # a finite "minus infinity": softmax gives exactly 0, and 0 * it stays 0 in the KL


def _log(p: torch.Tensor) -> torch.Tensor:
    return p.clamp_min(torch.finfo(p.dtype).tiny).log()


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
              temperature: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(TCKD, NCKD)`` of decoupled KD, each multiplied by ``T^2`` and averaged over the batch.

    With ``p = softmax(z / T)`` and target class ``y``:
    ``TCKD = KL(b^T || b^S)`` over the binary distribution ``b = [p_y, 1 - p_y]``;
    ``NCKD = KL(phat^T || phat^S)`` over the non-target classes, ``phat_k = p_k / (1 - p_y)``
    for ``k != y`` (a softmax of the logits without class ``y``)."""
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    target_mask = F.one_hot(targets.long(), s.shape[1]).bool()
    ps, pt = F.softmax(s, dim=1), F.softmax(t, dim=1)
    bs = torch.stack([(ps * target_mask).sum(1), (ps * ~target_mask).sum(1)], dim=1)
    bt = torch.stack([(pt * target_mask).sum(1), (pt * ~target_mask).sum(1)], dim=1)
    tckd = F.kl_div(_log(bs), bt, reduction="batchmean") * temperature**2
    log_ps_nt = F.log_softmax(s.masked_fill(target_mask, _MASKED), dim=1)
    pt_nt = F.softmax(t.masked_fill(target_mask, _MASKED), dim=1)
    nckd = F.kl_div(log_ps_nt, pt_nt, reduction="batchmean") * temperature**2
    return tckd, nckd


@register_knowledge("dkd")
class DKD(Knowledge):
    """Decoupled knowledge distillation, Zhao, Cui, Song, Qiu & Liang, CVPR 2022,
    arXiv:2203.08679.

    Classical KD splits as ``KD = TCKD + (1 - p_y^T) NCKD`` (see :func:`dkd_terms`); DKD
    weights the two parts independently:

    ``L = w(epoch) * (alpha * TCKD + beta * NCKD)``,  ``w(epoch) = min(epoch / warmup, 1)``

    Defaults ``alpha = 1``, ``beta = 8``, ``T = 4`` (the paper's CIFAR-100 setting and
    mdistiller's defaults; the paper tunes ``beta`` per setting) and a linear warm-up over
    ``warmup = 20`` of ``epochs = 240`` epochs (mdistiller's training code; epochs counted from 1).
    Pass ``epoch=`` to ``forward``, or ``progress=`` (the fraction of training done, which
    :class:`~dfkd.knowledge.terms.KnowledgeTerms` passes: ``epoch = progress * epochs``), to apply
    the warm-up; without either the factor is 1.

    DKD needs a target class. Data-free distillation has no labels, so when ``targets`` is
    ``None`` the teacher's argmax ``argmax_k z_k^T`` is used: TCKD then transfers the
    teacher's confidence in its own prediction and NCKD the ranking of the other classes.
    Zero when the logits are equal. No trainable parts.
    """

    needs = "logits"
    layers = None
    suggested_weight = 1.0

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, warmup: float = 20.0,
                 epochs: float = 240.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"dkd: temperature must be positive, got {temperature}")
        self.alpha, self.beta, self.temperature, self.warmup = float(alpha), float(beta), float(temperature), float(warmup)
        self.epochs = float(epochs)

    def warmup_factor(self, epoch: float | None) -> float:
        if epoch is None or self.warmup <= 0:
            return 1.0
        return min(float(epoch) / self.warmup, 1.0)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor | None = None,
                epoch: float | None = None, progress: float | None = None, **kw) -> torch.Tensor:
        if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
            raise ValueError(f"dkd: needs logits of one shape (B, K), got {tuple(student_logits.shape)} and "
                             f"{tuple(teacher_logits.shape)}")
        if targets is None:
            targets = teacher_logits.detach().argmax(dim=1)
        tckd, nckd = dkd_terms(student_logits, teacher_logits, targets, self.temperature)
        if epoch is None and progress is not None:
            epoch = progress * self.epochs
        return self.warmup_factor(epoch) * (self.alpha * tckd + self.beta * nckd)

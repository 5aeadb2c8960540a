"""The student's target and losses under per-member synthesis: the origin member's
distribution mixed with the other members' calibrated evidence, and the cross-member hard
negatives (formulas in :mod:`dfkd.multi.per_member`'s docstring)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dfkd.multi.calibrated import LogitCalibration


def member_target(union_logits: torch.Tensor, mask: torch.Tensor, origin: torch.Tensor,
                  calibration: LogitCalibration | None, origin_prior: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The target ``q`` ``(B, K)`` (a distribution) and the member posterior ``pi`` ``(T, B)``
    of :mod:`dfkd.multi.per_member`'s docstring, for logits ``(T, B, K)`` placed in the union, ``mask`` ``(T, K)``
    and ``origin`` ``(B,)``. ``calibration=None`` uses the raw logits as evidence."""
    z = union_logits.float()
    mask = mask.to(z.device, torch.bool)
    t = z.shape[0]
    zhat = calibration.standardize(z) if calibration is not None else z
    evidence = torch.logsumexp(zhat.masked_fill(~mask[:, None, :], float("-inf")), dim=-1)  # (T, B)
    if t > 1:
        a = float(origin_prior)
        is_origin = F.one_hot(origin.to(z.device), t).T.bool()  # (T, B)
        other = (1.0 - a) / (t - 1)
        log_prior = torch.where(is_origin, torch.full_like(evidence, a).log(),
                                torch.full_like(evidence, max(other, 1e-30)).log())
        posterior = torch.softmax(evidence + log_prior, dim=0)
    else:
        posterior = torch.ones_like(evidence)
    probs = torch.softmax(z.masked_fill(~mask[:, None, :], float("-inf")), dim=-1).masked_fill(~mask[:, None, :], 0.0)
    return (posterior[..., None] * probs).sum(dim=0), posterior


def member_losses(student_logits: torch.Tensor, target: torch.Tensor, origin: torch.Tensor, mask: torch.Tensor,
                  temperature: float = 1.0, negative_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """``{"kd": T^2 KL(q || p_S)}`` (``q`` softened as ``q^(1/T)``, renormalised) and, when
    ``negative_weight > 0`` and there are several members, ``{"negatives": w * neg}`` of the
    module docstring."""
    s = student_logits.float()
    log_q = target.clamp_min(1e-8).log()
    q_t = torch.softmax(log_q / temperature, dim=1)
    log_s = torch.log_softmax(s / temperature, dim=1)
    kd = (q_t * (q_t.clamp_min(1e-12).log() - log_s)).sum(dim=1).mean() * temperature**2
    losses = {"kd": kd}
    if negative_weight > 0 and mask.shape[0] > 1:
        own = mask.to(s.device, torch.bool)[origin.to(s.device)]  # (B, K): the origin's classes
        log_p = torch.log_softmax(s, dim=1)
        in_origin = torch.logsumexp(log_p.masked_fill(~own, float("-inf")), dim=1)  # log P_S(C_o)
        student_out = ~own.gather(1, s.argmax(dim=1, keepdim=True))[:, 0]
        target_in = own.gather(1, target.argmax(dim=1, keepdim=True))[:, 0]
        hard = (student_out & target_in).float()
        losses["negatives"] = negative_weight * (hard * -in_origin).mean()
    return losses

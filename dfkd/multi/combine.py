"""Combining the logits of several teachers into one target over the union label space.

Conventions shared by every combiner (``nn.Module``; ``forward(logits, mask)``):

- ``logits``: ``(T, B, K)`` -- teacher ``t``'s logits already *placed* in the union label
  space of ``K`` classes (see :class:`dfkd.multi.ensemble.TeacherEnsemble`). Entries of classes a
  teacher does not know are ignored (the ensemble fills them with 0).
- ``mask``: ``(T, K)`` bool -- ``mask[t, k]`` is true when teacher ``t`` knows union class ``k``.
- the result is ``(B, K)`` **merged logits**: unnormalised log-scores whose softmax is the
  merged distribution. Combiners that average *probabilities* return log-probabilities
  ``log p`` (floored at ``log 1e-8`` so that KL terms stay finite), which are valid logits.
  So every combiner's output can be used wherever one teacher's logits are (KD at
  temperature ``T`` divides them by ``T`` as usual).

Teacher ``t``'s own distribution is ``p_t = softmax(z_t)`` over *its* classes (zero outside
them) and its entropy ``H_t = -sum_k p_t(k) log p_t(k)``. Because every ``p_t`` sums to one,
any mixture ``sum_t w_t p_t`` with ``sum_t w_t = 1`` is a distribution over the union.

Each combiner also has :meth:`Combiner.loss`, the student loss it implies: by default KD
(``T^2 KL(softmax(merged/T) || softmax(s/T))``); the ``uhc`` combiner overrides it with the
UHC loss of Vongkulbhisal et al. (CVPR 2019), which needs no merged target at all.

Registry: ``@register_combiner("name")``, :func:`create_combiner`, :func:`list_combiners`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from dfkd.core.losses import kd_loss
from teachers.registry import Registry, name_class

__all__ = [
    "Combiner",
    "UnknownCombinerError",
    "register_combiner",
    "create_combiner",
    "list_combiners",
    "combiner_class",
    "masked_softmax",
    "check_mask",
    "teacher_probabilities",
    "teacher_entropies",
    "LOG_FLOOR",
    "CombinerWarning",
    "member_components",
    "resolve_combine",
    "component_listing",
]

#: Probabilities are floored at this value before taking logs (``log 1e-8 = -18.4``).
LOG_FLOOR = 1e-8

class UnknownCombinerError(ValueError):
    """An unknown combiner name, or options a combiner does not accept."""


class CombinerWarning(UserWarning):
    """A combiner that runs on these class sets but cannot use what they hold (``uhc`` on
    members whose class sets do not connect)."""


#: Every combiner by name (``@register_combiner("mean_prob")``).
COMBINERS: Registry[type["Combiner"]] = Registry("combiner", UnknownCombinerError, on_register=name_class)


def register_combiner(name: str) -> Callable[[type], type]:
    """Class decorator: make a :class:`Combiner` available under ``name``."""
    return COMBINERS.register(name)


def list_combiners() -> list[str]:
    return COMBINERS.names()


def combiner_class(name: str) -> type["Combiner"]:
    return COMBINERS.get(name)


def create_combiner(name: str, **options) -> "Combiner":
    """Build the combiner registered as ``name`` with its options (e.g. ``tau=0.5``)."""
    cls = combiner_class(name)
    try:
        return cls(**options)
    except TypeError as exc:
        raise UnknownCombinerError(f"combiner {name!r}: bad options {sorted(options)}: {exc}") from None


# ----------------------------------------------------------------------------- helpers
def check_logits(logits: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes are always checked; the mask's *content* only when it lives on the CPU (a
    check of a GPU mask would synchronise with the host on every step; the ensemble checks
    its mask once, on the CPU, when it is built)."""
    if logits.dim() != 3:
        raise ValueError(f"combiners take logits of shape (teachers, batch, classes), got {tuple(logits.shape)}")
    if mask.shape != (logits.shape[0], logits.shape[2]):
        raise ValueError(f"mask must be (teachers, classes) = {(logits.shape[0], logits.shape[2])}, got {tuple(mask.shape)}")
    if mask.device.type == "cpu":
        check_mask(mask)
    return logits.float(), mask.to(device=logits.device, dtype=torch.bool)


def check_mask(mask: torch.Tensor) -> None:
    """Every teacher must know at least one class."""
    if not bool(mask.bool().any(dim=1).all()):
        raise ValueError("every teacher must know at least one class (a row of the mask is all false)")


def member_components(mask: torch.Tensor) -> list[list[int]]:
    """The members linked by shared classes, directly or through other members: the connected
    components of the graph whose edges join two members that know a common class, each a
    sorted list of member indices, in order of their first member."""
    m = mask.bool().cpu()
    shared = (m.float() @ m.float().T) > 0  # (T, T): members with a common class
    component = list(range(m.shape[0]))
    changed = True
    while changed:  # label propagation: each member takes the smallest label among its neighbours
        changed = False
        for a in range(m.shape[0]):
            for b in range(m.shape[0]):
                if shared[a, b] and component[b] < component[a]:
                    component[a], changed = component[b], True
    groups: dict[int, list[int]] = {}
    for member, label in enumerate(component):
        groups.setdefault(label, []).append(member)
    return list(groups.values())


def component_listing(components: list[list[int]], names: Sequence[str] | None) -> str:
    """``"a, b | c"``: the members of each component by name (``#i`` without names)."""

    def name(i):
        return names[i] if names is not None else f"#{i}"

    return " | ".join(", ".join(name(i) for i in comp) for comp in components)


def resolve_combine(mask: torch.Tensor, names: Sequence[str] | None = None) -> tuple[str, str]:
    """The combiner ``combine="auto"`` stands for, chosen from the members' class sets, and why:

    - one member: ``mean_logits`` (its own logits: plain distillation);
    - disjoint class sets, or overlaps that leave some members unconnected:
      ``calibrated_concat`` (the members are put on one scale on the transfer images);
    - overlapping class sets that connect every member: ``uhc`` (the overlaps tie the
      members' scales together, and UHC needs no calibration; docs/experiments.md compares
      it with calibrated_concat on the Fashion-MNIST zoo (b)).
    """
    m = mask.bool().cpu()
    if m.shape[0] == 1:
        return "mean_logits", "one member: its own logits (plain distillation)"
    if not bool((m.sum(dim=0) > 1).any()):
        return "calibrated_concat", "disjoint class sets: each member's logits standardised on the transfer images"
    components = member_components(m)
    if len(components) > 1:
        return "calibrated_concat", (f"class sets overlap but do not connect every member ({component_listing(components, names)}): "
                                     "each member's logits standardised on the transfer images")
    return "uhc", "overlapping class sets that connect every member: UHC"


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``softmax`` of each teacher's logits over its own classes, 0 elsewhere: ``(T, B, K)``."""
    m = mask[:, None, :]
    return torch.softmax(logits.masked_fill(~m, float("-inf")), dim=-1).masked_fill(~m, 0.0)


def teacher_probabilities(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``p_t`` of every teacher in the union space (see module doc): ``(T, B, K)``."""
    logits, mask = check_logits(logits, mask)
    return masked_softmax(logits, mask)


def teacher_entropies(probs: torch.Tensor, normalize: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``H_t(x) = -sum_k p_t(k) log p_t(k)`` (natural log): ``(T, B)``. With ``normalize``,
    divided by ``log |C_t|`` (the maximum for a teacher of ``|C_t|`` classes; 1 if it has one)."""
    h = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)
    if normalize:
        if mask is None:
            raise ValueError("normalize needs the mask")
        sizes = mask.sum(dim=1).float().clamp_min(2.0)
        h = h / sizes.log()[:, None]
    return h


def floored_log(p: torch.Tensor) -> torch.Tensor:
    return p.clamp_min(LOG_FLOOR).log()


def mixture(probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_t w_t p_t`` for weights ``(T,)`` or ``(T, B)`` summing to one over ``t``."""
    if weights.dim() == 1:
        weights = weights[:, None]
    return (weights[..., None] * probs).sum(dim=0)


def masked_mean_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask[:, None, :].float()
    return (logits * m).sum(dim=0) / m.sum(dim=0).clamp_min(1.0)


# ----------------------------------------------------------------------------- base class
class Combiner(nn.Module):
    """Base class: ``forward(logits (T,B,K), mask (T,K)) -> merged logits (B,K)``.

    Stochastic combiners (``noisy``, ``pate``) add their noise only in training mode
    (``combiner.train()``); in eval mode they are deterministic. A
    :class:`~dfkd.multi.ensemble.TeacherEnsemble` keeps its own combiner in eval mode; the
    student-loss wrapper (:class:`dfkd.multi.synthesizer.AmalgamationSynthesizer`) uses a
    training-mode instance for the student's targets.
    """

    name = "base"

    def forward(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError("abstract: each combiner implements forward()")

    def check_mask(self, mask: torch.Tensor, names: Sequence[str] | None = None) -> None:
        """Raise ``ValueError`` if this combiner cannot merge teachers with these class sets
        (called once by the ensemble when it is built; ``names`` are the members', for messages)."""
        check_mask(mask)

    def loss(self, student_logits: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor,
             temperature: float = 1.0, merged: torch.Tensor | None = None) -> torch.Tensor:
        """The student loss: ``T^2 KL(softmax(merged/T) || softmax(s/T))`` (batch mean).

        ``merged`` may be given when already computed (it must come from this combiner)."""
        if merged is None:
            merged = self(logits, mask)
        return kd_loss(student_logits, merged.detach(), temperature)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.describe().items())

    def describe(self) -> dict:
        return {}


# ----------------------------------------------------------------------------- same label space

"""The engine's non-finite guard: whether every step since a point was finite, kept on the device.

Folding a step in (:meth:`FiniteGuard.fold`) is device arithmetic only; :meth:`FiniteGuard.check`
reads it back in one host synchronisation (reduced over the ranks of a torchrun launch), at
logging steps, before every save and at the end, so that no state is written from a step whose
loss (or whose synthesis terms, or, when asked, the student's weights) was not finite.
"""
from __future__ import annotations

import torch
from torch import nn

from dfkd.engine.distributed import World, all_min


class NonFiniteError(RuntimeError):
    """A step's loss or the student's weights were not finite."""


class FiniteGuard:
    """Accumulates, from step ``start`` on, whether every step was finite (module docstring)."""

    def __init__(self, device: torch.device, world: World, start: int = 0):
        self.device, self.world = device, world
        self.reset(start)

    def reset(self, start: int) -> None:
        self.all_finite = torch.ones((), dtype=torch.bool, device=self.device)
        self.finite_steps = torch.zeros((), dtype=torch.long, device=self.device)  # steps before the first bad one
        self.start = start

    def fold(self, total: torch.Tensor, terms: dict | None) -> None:
        """Fold one step's total loss and synthesis ``terms`` in (device ops only, no sync)."""
        ok = torch.isfinite(total.detach())
        for value in (terms or {}).values():
            if isinstance(value, torch.Tensor):
                ok = ok & torch.isfinite(value.detach()).all()
        self.all_finite.logical_and_(ok.to(self.device))
        self.finite_steps.add_(self.all_finite)

    def check(self, step: int, student: nn.Module | None = None, terms: dict | None = None) -> None:
        """Raise :class:`NonFiniteError` naming the first bad step (and the non-finite ``terms``),
        or, with ``student``, weights that became non-finite by ``step``: one host sync."""
        flags = [self.all_finite, self.finite_steps]
        if student is not None:
            flags += [torch.isfinite(p.detach()).all().to(self.device) for p in student.parameters()]
        all_finite, finite_steps, *weights_ok = all_min(torch.stack([f.long() for f in flags]), self.world).tolist()
        if all_finite and all(weights_ok):
            return
        if all_finite:
            raise NonFiniteError(f"the student's weights became non-finite by step {step}")
        names = [repr(k) for k, v in (terms or {}).items() if isinstance(v, torch.Tensor) and not bool(v.isfinite().all())]
        which = f" (loss term{'s' if len(names) > 1 else ''} {', '.join(names)})" if names else ""
        raise NonFiniteError(f"the loss became non-finite at step {self.start + finite_steps + 1}{which}")

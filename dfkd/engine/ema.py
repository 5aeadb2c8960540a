"""Exponential moving average of the student's weights (Polyak-Ruppert averaging).

    w_ema <- d_t * w_ema + (1 - d_t) * w,      d_t = min(decay, (1 + t) / (10 + t))

after every optimiser step ``t`` (the warm-up form of TensorFlow's
``ExponentialMovingAverage(num_updates=t)``, so the random initial weights fade out early).
Polyak & Juditsky (SIAM J. Control Optim. 1992) for the averaging; mean-teacher style
weight EMAs are standard in semi-supervised learning (Tarvainen & Valpola, NeurIPS 2017).
In data-free KD the student trains on a moving, synthetic distribution; the average smooths
the last rounds' drift. Off by default (``student_ema: 0``).

The average is kept as plain tensors (not a copy of the module), so hooks that methods
attach to the student are not duplicated. ``swapped_in()`` puts the averaged weights into
the student for evaluation and restores the trained ones after; ``copy_into()`` makes the
average the student for good (at the end of a run).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class WeightAverage:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"student_ema must be a decay in (0, 1), e.g. 0.999, or 0 to turn it off; got {decay}")
        self.decay = float(decay)
        self.updates = 0
        self._tracked = self._tensors(model)
        self.shadow = [t.detach().clone() for t in self._tracked]

    @staticmethod
    def _tensors(model: nn.Module) -> list[torch.Tensor]:
        """Parameters and floating-point buffers (BN running statistics), in a fixed order."""
        buffers = [b for b in model.buffers() if b.is_floating_point()]
        return [p.data for p in model.parameters()] + [b.data for b in buffers]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, self._tracked, 1.0 - decay)

    @torch.no_grad()
    def _swap(self) -> None:
        for live, avg in zip(self._tracked, self.shadow):
            held = live.clone()
            live.copy_(avg)
            avg.copy_(held)

    @contextmanager
    def swapped_in(self):
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @torch.no_grad()
    def copy_into(self) -> None:
        for live, avg in zip(self._tracked, self.shadow):
            live.copy_(avg)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": self.shadow}  # torch.save copies; the decay comes from the config

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError("student_ema state does not match the student (different number of tensors)")
        self.updates = int(state["updates"])
        for avg, saved in zip(self.shadow, state["shadow"]):
            avg.copy_(saved)

"""Batch moments over every process of a ``torchrun`` launch, differentiable.

With several processes each rank inverts its own share of a batch; BatchNorm-statistics terms
can compare the teacher's running statistics with the moments of the *global* batch instead of
each rank's share (:func:`global_mean_var`, ``BNStatisticsHook(global_moments=True)``). With one
process (or no process group) they are ``torch.var_mean``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """The number of processes of the current process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _SumOverRanks(torch.autograd.Function):
    """``all_reduce(SUM)`` forward; the gradient passes through unchanged. A loss built on the
    sum is the same on every rank, so each rank already holds the whole ``dL/dsum`` and its
    own share's gradient is exactly that (an all-reduce backward would count it once per rank)."""

    @staticmethod
    def forward(ctx, x):
        total = x.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad


def global_mean_var(x: torch.Tensor, dims: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased) variance of ``x`` over ``dims`` and over every rank's batch. Gradients
    reach each rank's own images and equal those of one process holding every batch (see
    :class:`_SumOverRanks`). With one process, ``torch.var_mean``."""
    if world_size() == 1:
        var, mean = torch.var_mean(x, dim=dims, unbiased=False)
        return mean, var
    count = torch.full((1,), float(x.numel() // x.shape[1]), device=x.device, dtype=x.dtype)
    sums = _SumOverRanks.apply(torch.cat([count, x.sum(dims), (x * x).sum(dims)]))
    total, channels = sums[0], x.shape[1]
    mean = sums[1 : 1 + channels] / total
    return mean, sums[1 + channels :] / total - mean * mean

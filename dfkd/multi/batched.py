"""Members of one architecture in one pass.

A zoo often holds several members of the same architecture (the same network trained on
different class sets, or from different seeds). Their forward passes are the same computation
with different weights, so :class:`StackedMembers` runs them as one: the members' parameters and
buffers are stacked (:func:`torch.func.stack_module_state`) and one structural copy of the
network is called under :func:`torch.func.vmap` over the stack (:func:`torch.func.functional_call`),
returning every member's logits and penultimate features at once. Gradients flow through it as
through the separate passes (the synthesizers' image gradients).

Members are stacked when they have the same module type, the same parameter and buffer names,
shapes and dtypes, the same input shape and head path, and live on the same device
(:func:`stack_groups`). A pass is batched only when no member of the group has an *active* forward
hook on it: a BatchNorm-statistics hook of a synthesizer (:class:`dfkd.core.bn.BNStatisticsHook`,
which must see each member's own activations) or a feature tap of feature amalgamation makes
that pass run member by member (:func:`hooks_active`). Members are frozen, so the stacked
weights are taken once per device and kept (a second copy of the group's weights).

:attr:`dfkd.multi.ensemble.TeacherEnsemble.batch_members` decides: ``None`` (default) stacks on
CUDA only. On a CPU, one stacked pass was slower than separate passes (5 members on class
pairs relabelling 256 images, one thread: lenet5_bn 0.64 s against 0.45 s, resnet8 8.1 s against
2.7 s; ``benchmarks/member_passes.py``, ``benchmarks/results/member_passes_cpu.json``): vmapped
convolutions become grouped convolutions, which the CPU kernels run slowly. On CUDA the stacked
pass saves a kernel launch per layer and member; ``benchmarks/member_passes.py --device cuda``
measures it.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from dfkd.core.taps import FeatureTap
from dfkd.multi.placement import DeviceBridge


def signature(member: nn.Module, shape: Sequence[int], head: str) -> tuple:
    """What must be equal for two members to share a pass (module docstring)."""
    state = tuple((name, tuple(t.shape), t.dtype, t.device) for name, t in
                  [*member.named_parameters(), *member.named_buffers()])
    return type(member), state, tuple(shape), head


def stack_groups(members: Sequence[nn.Module], shapes: Sequence[Sequence[int]], heads: Sequence[str]) -> list[list[int]]:
    """Member indices grouped by :func:`signature`, in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for i, (member, shape, head) in enumerate(zip(members, shapes, heads)):
        groups.setdefault(signature(member, shape, head), []).append(i)
    return list(groups.values())


def hooks_active(member: nn.Module) -> bool:
    """Whether a forward hook on ``member`` (or inside it) would act on a pass: every hook except
    a device bridge's and those whose owner says ``enabled = False`` (a synthesizer's BN hook
    outside its capture)."""
    for module in member.modules():
        for fn in (*module._forward_pre_hooks.values(), *module._forward_hooks.values()):
            owner = getattr(fn, "__self__", None)
            if isinstance(owner, DeviceBridge):
                continue
            if getattr(owner, "enabled", True):
                return True
    return False


class StackedMembers:
    """``members`` (one :func:`signature`) called as one: ``(x) -> (logits (G, B, k), features (G, B, F))``,
    ``features`` the flattened input of ``head``."""

    def __init__(self, members: Sequence[nn.Module], head: str):
        self.members, self.head = list(members), head
        self.base = copy.deepcopy(self.members[0]).to("meta")  # the structure; weights come from the stack
        for module in self.base.modules():  # a copy's hooks (bridges, taps) are not the stack's
            module._forward_pre_hooks.clear()
            module._forward_hooks.clear()
        self._stacks: dict[torch.device, tuple[dict, dict]] = {}

    def _stack(self, device: torch.device) -> tuple[dict, dict]:
        if device not in self._stacks:
            params, buffers = torch.func.stack_module_state(self.members)
            self._stacks = {device: ({k: v.to(device) for k, v in params.items()},
                                     {k: v.to(device) for k, v in buffers.items()})}
        return self._stacks[device]

    def _one(self, params: dict, buffers: dict, x: torch.Tensor):
        with FeatureTap(self.base, [self.head], capture="input") as taps:
            logits = torch.func.functional_call(self.base, (params, buffers), (x,))
            return logits, taps[self.head].flatten(1)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        params, buffers = self._stack(x.device)
        return torch.func.vmap(self._one, in_dims=(0, 0, None))(params, buffers, x)

"""Ensemble members on devices of their own, for a zoo that does not fit on one device.

``member_devices`` lists devices; member ``i`` lives on ``devices[i % len(devices)]``. A placed
member is bridged by two forward hooks: its input moves to its device (``non_blocking``) and its
output comes back to the device the input came from, so every caller (the ensemble's merged and
per-member passes, per-member synthesis, evaluation) sees tensors on the run's device, and
autograd carries gradients across (the synthesizers' image gradients flow back through the
bridge). What a member computes inside stays on its device: BatchNorm-statistics losses are
gathered onto the caller's device by :meth:`dfkd.core.bn.BNStatisticsHook.loss`, tapped
features by whoever reads them (:meth:`TeacherEnsemble.forward_all`).

Only the members move; generators, banks, the student and the combiner stay on the run's
device. Placement survives ``ensemble.to(device)`` (:meth:`TeacherEnsemble._apply` re-places).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from teachers.device import DeviceError, resolve_device


class PlacementError(ValueError):
    """A member device this machine does not have, or an empty list."""


def parse_member_devices(spec) -> list[torch.device]:
    """``"cuda:0,cuda:1"`` or a list of names as devices this machine has (one-line
    :class:`PlacementError` otherwise)."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    names = [n for n in names if n]
    if not names:
        raise PlacementError("--member-devices: give one or more devices, e.g. cuda:0,cuda:1")
    devices = []
    for name in names:
        if name == "auto":
            raise PlacementError("--member-devices: name each device (e.g. cuda:0,cuda:1); auto is for --device")
        try:
            devices.append(resolve_device(name))
        except DeviceError as exc:
            raise PlacementError(str(exc).replace("--device", "--member-devices", 1)) from None
    return devices


class DeviceBridge:
    """The two hooks that keep ``module`` on ``device`` while its callers stay where they are."""

    def __init__(self, module: nn.Module, device: torch.device):
        self.module, self.device = module, torch.device(device)
        self._home: list[torch.device] = []  # the caller's device, per nested call
        self._handles = [module.register_forward_pre_hook(self._enter), module.register_forward_hook(self._leave)]

    def _enter(self, module, args):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        self._home.append(first.device if first is not None else self.device)
        return tuple(a.to(self.device, non_blocking=True) if isinstance(a, torch.Tensor) else a for a in args)

    def _leave(self, module, args, output):
        home = self._home.pop()
        if isinstance(output, torch.Tensor):
            return output.to(home, non_blocking=True)
        return output

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def place(members: Sequence[nn.Module], devices: Sequence[torch.device],
          bridges: list[DeviceBridge] | None = None) -> list[DeviceBridge]:
    """Move member ``i`` to ``devices[i % len(devices)]`` and bridge it; removes ``bridges``
    (an earlier placement) first. Returns the new bridges (none for no ``devices``)."""
    for bridge in bridges or []:
        bridge.remove()
    placed = []
    if not devices:
        return placed
    for i, member in enumerate(members):
        device = torch.device(devices[i % len(devices)])
        member.to(device)
        placed.append(DeviceBridge(member, device))
    return placed

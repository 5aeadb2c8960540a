"""Input normalisation wrapper, the model factory used by checkpoints, and ``freeze``.

Images travel between dfkd components as float NCHW tensors in [0, 1]; every zoo model
carries its own mean/std and applies them in :class:`NormalizedModel`, so generators never
know a data set's statistics and differently normalised teachers can be ensembled.
"""
from __future__ import annotations

import types
from typing import Sequence

import torch
import torch.nn as nn

from teachers.factory import create_model

__all__ = ["NormalizedModel", "build_model", "freeze", "is_frozen"]


def _stat_buffer(values, name: str) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32).detach().clone().reshape(1, -1, 1, 1)
    if name == "std" and bool((t <= 0).any()):
        raise ValueError(f"std must be positive, got {t.flatten().tolist()}")
    return t


class NormalizedModel(nn.Module):
    """``forward(x) = net((x - mean) / std)`` for images ``x`` in [0, 1].

    Attributes:
        net: the raw network (its module paths are the ones in ``head_path`` /
            ``block_paths``; prefix them with ``"net."`` to address them from this wrapper).
        mean, std: buffers of shape ``(1, C, 1, 1)`` (saved in the state dict).
        arch, arch_kwargs: how to rebuild ``net`` (set by :func:`build_model`).

    A model passed to :func:`freeze` ignores ``train()`` calls, including those that come
    from a parent module, and stays in eval mode.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor):
        super().__init__()
        self.net = net
        mean_t, std_t = _stat_buffer(mean, "mean"), _stat_buffer(std, "std")
        if mean_t.shape != std_t.shape:
            raise ValueError(f"mean and std differ in length: {mean_t.shape[1]} vs {std_t.shape[1]}")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)
        self.arch: str | None = None
        self.arch_kwargs: dict = {}
        self._frozen = False

    @property
    def head_path(self) -> str:
        """Path of the final ``nn.Linear`` inside ``net``."""
        return self.net.head_path

    @property
    def block_paths(self) -> tuple[str, ...]:
        """Paths of the feature stages inside ``net``."""
        return tuple(self.net.block_paths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)

    def train(self, mode: bool = True) -> "NormalizedModel":
        return super().train(False if self._frozen else mode)

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, frozen={self._frozen}"


def build_model(
    arch: str,
    num_classes: int,
    in_channels: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    **arch_kwargs,
) -> NormalizedModel:
    """``create_model(arch, ...)`` wrapped in a :class:`NormalizedModel`.

    A single ``mean``/``std`` value is repeated for every channel. Records ``arch`` and
    ``arch_kwargs`` (including ``num_classes``, ``in_channels``, ``image_size``) so that a
    checkpoint can rebuild the model.
    """
    net = create_model(arch, num_classes=num_classes, in_channels=in_channels, image_size=image_size, **arch_kwargs)
    mean_t, std_t = _stat_buffer(mean, "mean"), _stat_buffer(std, "std")
    for name, t in (("mean", mean_t), ("std", std_t)):
        if t.shape[1] not in (1, in_channels):
            raise ValueError(f"{name} has {t.shape[1]} values but the model reads {in_channels} channels")
    model = NormalizedModel(
        net, mean_t.expand(1, in_channels, 1, 1).contiguous(), std_t.expand(1, in_channels, 1, 1).contiguous()
    )
    model.arch = arch
    model.arch_kwargs = dict(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **arch_kwargs)
    return model


def _frozen_train(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def freeze(model: nn.Module) -> nn.Module:
    """Freeze a teacher, the one place dfkd does so: ``eval()``, ``requires_grad_(False)``.

    Afterwards ``model.train()`` -- or ``.train()`` on any parent module that contains it,
    such as a student-plus-teacher wrapper -- leaves it in eval mode (BatchNorm keeps its
    running statistics, dropout stays off). For a :class:`NormalizedModel` this sets its
    ``_frozen`` flag; for any other module it overrides ``train`` on that instance.
    Gradients still flow *through* a frozen model to its input (DeepInversion, DAFL).
    Returns ``model``.
    """
    model.eval()
    model.requires_grad_(False)
    if isinstance(model, NormalizedModel):
        model._frozen = True
    else:
        model.train = types.MethodType(_frozen_train, model)
        model._frozen = True
    return model


def is_frozen(model: nn.Module) -> bool:
    """Whether :func:`freeze` was applied to ``model``."""
    return bool(getattr(model, "_frozen", False))

"""``create_model(name, ...)``: a registered architecture or a stock torchvision classifier."""
from __future__ import annotations

import torch.nn as nn

import teachers.models  # noqa: F401  (registers the built-in architectures)
from teachers.models.tv import create_tv_model
from teachers.registry import MODELS, TV_PREFIX, UnknownModelError, unknown_model_message


def create_model(
    name: str, num_classes: int = 10, in_channels: int = 1, image_size: int = 32, **kwargs
) -> nn.Module:
    """Build the raw network ``name`` (expects normalised input).

    ``tv:<name>`` builds a torchvision classifier with ``weights=None``, its first convolution
    adapted to ``in_channels``, a small-image stem for ``image_size <= 64`` and a head for
    ``num_classes`` (see :func:`teachers.models.tv.create_tv_model`).

    Raises :class:`UnknownModelError` listing the known names for an unknown ``name``.
    """
    if not isinstance(name, str):
        raise UnknownModelError(unknown_model_message(repr(name)))
    if name.startswith(TV_PREFIX):
        return create_tv_model(name[len(TV_PREFIX):], num_classes, in_channels, image_size, **kwargs)
    builder = MODELS.get(name)
    return builder(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)

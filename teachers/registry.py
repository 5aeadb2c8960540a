"""Model registry: ``@register_model(name)`` and ``create_model(name, ...)``.

Every builder has the signature ``fn(num_classes, in_channels, image_size, **kw) -> nn.Module``
and returns a *raw* network: it expects already-normalised input (wrap it in
:class:`teachers.normalize.NormalizedModel` to feed it images in [0, 1]).

Every raw network carries two attributes that the rest of dfkd relies on:

``head_path``
    module path (as in ``named_modules()``) of its final ``nn.Linear``; the *input* of that
    module is the penultimate feature vector.
``block_paths``
    module paths of the main stages whose outputs are the intermediate feature maps used by
    attention transfer and feature taps (e.g. ``("layer1", "layer2", "layer3")``).

Names starting with ``tv:`` (``tv:resnet18``, ``tv:mobilenet_v3_small``) build a stock
torchvision classifier (see :mod:`teachers.models.tv`); they are not listed by
:func:`list_models`.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

__all__ = ["UnknownModelError", "register_model", "create_model", "list_models", "TV_PREFIX"]

TV_PREFIX = "tv:"

Builder = Callable[..., nn.Module]
_REGISTRY: dict[str, Builder] = {}


class UnknownModelError(ValueError):
    """Raised for a model name that is neither registered nor a ``tv:<torchvision name>``."""


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering ``fn(num_classes, in_channels, image_size, **kw) -> nn.Module``."""
    if not isinstance(name, str) or not name:
        raise ValueError("a model name must be a non-empty string")
    if name.startswith(TV_PREFIX):
        raise ValueError(f"model names starting with {TV_PREFIX!r} are reserved for torchvision models")

    def decorator(fn: Builder) -> Builder:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return decorator


def _ensure_builtin_models() -> None:
    # Importing the package registers the built-in architectures (lazy to avoid import cycles).
    import teachers.models  # noqa: F401


def list_models() -> list[str]:
    """Sorted names of the registered models.

    Torchvision classifiers (``tv:<name>``, e.g. ``tv:resnet18``) are accepted by
    :func:`create_model` as well but are not listed here.
    """
    _ensure_builtin_models()
    return sorted(_REGISTRY)


def unknown_model_message(name: str) -> str:
    """The message of :class:`UnknownModelError` for ``name`` (reused by checkpoint errors)."""
    return (
        f"unknown model {name!r}. Known models: {', '.join(list_models())}. "
        f"Torchvision classifiers are accepted as '{TV_PREFIX}<torchvision name>' (e.g. 'tv:resnet18')."
    )


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
        from teachers.models.tv import create_tv_model

        return create_tv_model(name[len(TV_PREFIX):], num_classes, in_channels, image_size, **kwargs)
    _ensure_builtin_models()
    try:
        builder = _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(unknown_model_message(name)) from None
    return builder(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)

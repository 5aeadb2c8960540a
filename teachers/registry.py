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

from typing import Any, Callable, Generic, TypeVar

import torch.nn as nn

__all__ = ["Registry", "name_class", "UnknownModelError", "register_model", "list_models", "unknown_model_message", "MODELS",
           "TV_PREFIX"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Names to objects, filled by a decorator: the one registry type of the package (models,
    synthesizers, combiners, data sets).

    ``key`` normalises names (e.g. case and ``_``/``-``); ``plural`` names the kind in the list of
    known names (default: the kind with an ``s``); ``on_register(name, obj)`` may check
    or adapt an object before it is stored (and returns what is stored); an unknown name raises
    ``error`` with a message that lists the known names (or ``unknown_message(name)``), and so
    does a bad or duplicate registration.
    """

    def __init__(self, kind: str, error: type[Exception] = KeyError, key: Callable[[str], str] = str,
                 on_register: Callable[[str, Any], Any] | None = None,
                 unknown_message: Callable[[str], str] | None = None, plural: str | None = None):
        self.kind, self.error, self.key = kind, error, key
        self.plural = plural or f"{kind}s"
        self.on_register = on_register
        self.unknown_message = unknown_message
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        """Decorator: store the decorated object under ``name`` and return it unchanged."""
        if not isinstance(name, str) or not name.strip():
            raise self.error(f"a {self.kind} name must be a non-empty string, got {name!r}")

        def decorator(obj):
            key = self.key(name)
            stored = self.on_register(key, obj) if self.on_register else obj
            if key in self._items and self._items[key] is not stored:
                raise self.error(f"a {self.kind} named {name!r} is already registered; choose another name")
            self._items[key] = stored
            return obj

        return decorator

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and self.key(name) in self._items

    def get(self, name: str) -> T:
        """The object registered as ``name``; an unknown name raises ``error`` listing the known ones."""
        if name not in self:
            message = (self.unknown_message(name) if self.unknown_message
                       else f"unknown {self.kind} {name!r}; known {self.plural}: {', '.join(self.names())}")
            raise self.error(message)
        return self._items[self.key(name)]


def name_class(name: str, cls: type) -> type:
    """An ``on_register`` for registries of classes: the class learns its registered name
    (``cls.name``)."""
    cls.name = name
    return cls


TV_PREFIX = "tv:"

Builder = Callable[..., nn.Module]


class UnknownModelError(ValueError):
    """Raised for a model name that is neither registered nor a ``tv:<torchvision name>``."""


def unknown_model_message(name: str) -> str:
    """The message of :class:`UnknownModelError` for ``name`` (reused by checkpoint errors)."""
    return (
        f"unknown model {name!r}. Known models: {', '.join(list_models())}. "
        f"Torchvision classifiers are accepted as '{TV_PREFIX}<torchvision name>' (e.g. 'tv:resnet18')."
    )


#: ``fn(num_classes, in_channels, image_size, **kw) -> nn.Module`` builders by name.
MODELS: Registry[Builder] = Registry("model", UnknownModelError, unknown_message=unknown_model_message)


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering ``fn(num_classes, in_channels, image_size, **kw) -> nn.Module``."""
    if isinstance(name, str) and name.startswith(TV_PREFIX):
        raise ValueError(f"model names starting with {TV_PREFIX!r} are reserved for torchvision models")
    return MODELS.register(name)


def list_models() -> list[str]:
    """Sorted names of the registered models.

    Torchvision classifiers (``tv:<name>``, e.g. ``tv:resnet18``) are accepted by
    :func:`teachers.factory.create_model` as well but are not listed here.
    """
    return MODELS.names()

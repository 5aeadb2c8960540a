"""Forward hooks that capture features by module path, never by model surgery.

``FeatureTap(model, ["layer2", "fc"])`` captures the outputs (or inputs) of modules named by
their ``named_modules()`` path. Paths are resolved on ``model.net`` when the model is a
normalisation wrapper (so users write the paths of the architecture they know), else on the
model itself, so stock torchvision models work unchanged.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


class FeatureTapError(ValueError):
    """A module path that does not exist in the model."""


def inner_network(model: nn.Module) -> nn.Module:
    """The network whose module paths users name: ``model.net`` for wrappers, else ``model``."""
    return getattr(model, "net", model)


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """Return the sub-module at ``path`` (``""`` is the network itself)."""
    net = inner_network(model)
    modules = dict(net.named_modules())
    if path not in modules:
        known = [name for name in modules if name][:40]
        raise FeatureTapError(
            f"module path {path!r} not found in {type(net).__name__}; known paths include: {', '.join(known)}"
        )
    return modules[path]


class FeatureTap:
    """Capture module outputs (``capture="output"``) or first inputs (``"input"``) by path.

    Use as a context manager or call :meth:`close`. After a forward pass, ``tap[path]`` (or
    ``tap.features``) holds the tensors of that pass; they keep their autograd graph so a loss
    on them back-propagates into the model's input.
    """

    def __init__(self, model: nn.Module, paths: Iterable[str], capture: str = "output"):
        if capture not in ("output", "input"):
            raise ValueError(f"capture must be 'output' or 'input', not {capture!r}")
        self.paths = list(paths)
        self.features: dict[str, torch.Tensor] = {}
        self._handles = []
        for path in self.paths:
            module = resolve_module(model, path)
            if capture == "output":
                handle = module.register_forward_hook(self._output_hook(path))
            else:
                handle = module.register_forward_pre_hook(self._input_hook(path))
            self._handles.append(handle)

    def _output_hook(self, path):
        def hook(module, inputs, output):
            self.features[path] = output

        return hook

    def _input_hook(self, path):
        def hook(module, inputs):
            self.features[path] = inputs[0]

        return hook

    def __getitem__(self, path: str) -> torch.Tensor:
        if path not in self.features:
            raise KeyError(f"no feature captured for {path!r}: run a forward pass first")
        return self.features[path]

    def clear(self) -> None:
        self.features = {}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _head_path(model: nn.Module) -> str | None:
    return getattr(model, "head_path", None) or getattr(inner_network(model), "head_path", None)


def penultimate_tap(model: nn.Module) -> FeatureTap:
    """A tap on the input of the model's classifier head (``head_path``): its penultimate
    features (the embedding plots; DAFL with ``activation_features="penultimate"``)."""
    head = _head_path(model)
    if head is None:
        raise FeatureTapError(f"{type(model).__name__} has no head_path; name the feature layer explicitly")
    return FeatureTap(model, [head], capture="input")


def fc_input_tap(model: nn.Module) -> FeatureTap:
    """A tap on the features *before the fully connected layers*: the input of the first
    ``nn.Linear`` that follows a convolution (LeNet-5: ``conv3``'s 120 features, the input of
    ``fc1``; a ResNet: its pooled features, the input of the classifier head), as DAFL's
    official code defines its activation loss's ``f_T``. Networks without such a layer (MLPs)
    and teacher ensembles (whose ``head_path`` is not a layer but the junction where every
    member's penultimate features meet) get :func:`penultimate_tap`."""
    head = _head_path(model)
    if head is not None and not isinstance(resolve_module(model, head), nn.Linear):
        return penultimate_tap(model)
    seen_conv = False
    for path, module in inner_network(model).named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            seen_conv = True
        elif isinstance(module, nn.Linear) and seen_conv:
            return FeatureTap(model, [path], capture="input")
    return penultimate_tap(model)

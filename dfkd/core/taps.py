"""The model interface, and forward hooks that capture features by module path (never by
model surgery).

The model interface is all the package reads from a model besides calling it:

- ``head_path``: the module whose *input* is the penultimate feature vector (the classifier
  head, an ``nn.Linear``; for a teacher ensemble, the junction where every member's
  penultimate features meet);
- ``block_paths``: the modules whose outputs are the feature stages (attention transfer,
  feature amalgamation); may be empty;
- ``members`` (teacher ensembles only): the member models, each a model of this interface.

Zoo architectures declare ``head_path``/``block_paths`` on their network, torchvision models
get them from :func:`teachers.models.tv.create_tv_model`, :class:`teachers.NormalizedModel`
reads them from its network, and :class:`dfkd.multi.ensemble.TeacherEnsemble` declares its
own. Code reads them through :func:`head_path`, :func:`block_paths`, :func:`members` and
:func:`bn_layers`, never with ``getattr``.

``FeatureTap(model, ["layer2", "fc"])`` captures the outputs (or inputs) of modules named by
their ``named_modules()`` path. Paths are resolved on ``model.net`` when the model is a
normalisation wrapper (so users write the paths of the architecture they know), else on the
model itself, so stock torchvision models work unchanged. A model wrapped for training in
``DistributedDataParallel`` is read through its ``module``.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


class FeatureTapError(ValueError):
    """A module path that does not exist in the model."""


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The model itself, out of a ``DistributedDataParallel`` wrapper when it is in one."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def inner_network(model: nn.Module) -> nn.Module:
    """The network whose module paths users name: ``model.net`` for wrappers, else ``model``."""
    model = unwrap_parallel(model)
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


def head_path(model: nn.Module) -> str | None:
    """The model's ``head_path`` (module docstring), or ``None`` when it declares none."""
    return getattr(unwrap_parallel(model), "head_path", None) or getattr(inner_network(model), "head_path", None)


def block_paths(model: nn.Module) -> tuple[str, ...]:
    """The model's ``block_paths`` (module docstring); empty when it declares none."""
    return tuple(getattr(unwrap_parallel(model), "block_paths", None) or getattr(inner_network(model), "block_paths", None)
                 or ())


def members(model: nn.Module) -> list[nn.Module]:
    """The members of a teacher ensemble; ``[model]`` for a single model."""
    found = getattr(model, "members", None)
    return list(found) if found is not None else [model]


def is_ensemble(model: nn.Module) -> bool:
    return getattr(model, "members", None) is not None


def bn_layers(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer of the model (of all members, for an ensemble), in module order."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def penultimate_tap(model: nn.Module) -> FeatureTap:
    """A tap on the input of the model's classifier head (``head_path``): its penultimate
    features (the embedding plots; DAFL with ``activation_features="penultimate"``)."""
    head = head_path(model)
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
    head = head_path(model)
    if head is not None and not isinstance(resolve_module(model, head), nn.Linear):
        return penultimate_tap(model)
    seen_conv = False
    for path, module in inner_network(model).named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            seen_conv = True
        elif isinstance(module, nn.Linear) and seen_conv:
            return FeatureTap(model, [path], capture="input")
    return penultimate_tap(model)

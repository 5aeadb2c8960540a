"""Forward hooks: features by module path and BatchNorm statistics, never model surgery.

``FeatureTap(model, ["layer2", "fc"])`` captures the outputs (or inputs) of modules named by
their ``named_modules()`` path. Paths are resolved on ``model.net`` when the model is a
normalisation wrapper (so users write the paths of the architecture they know), else on the
model itself, so stock torchvision models work unchanged.
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import nn

from dfkd.losses import bn_statistics_loss


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


class BNStatisticsHook:
    """DeepInversion's feature-distribution regulariser over every BatchNorm layer.

    On each forward pass, for each ``nn.BatchNorm1d/2d`` in eval mode, compares the batch
    mean and (biased) variance of the layer's input with its running statistics
    (:func:`dfkd.losses.bn_statistics_loss`). ``loss()`` returns the sum over layers of the
    last forward pass; ``layer_losses`` the per-layer terms.

    Per-sample masks (:meth:`set_sample_masks`, an extension for teacher *ensembles*): a
    member trained on classes ``C_t`` keeps BN statistics of images of ``C_t`` only, so its
    layers are matched on the images whose target class is in ``C_t`` (masked mean and
    biased variance), not on the whole batch, which also holds the other members' classes
    (:func:`member_sample_masks`). A layer whose mask is empty adds nothing.

    ``momentum = m > 0`` (Fast, Fang et al., AAAI 2022, official ``bn_mmt=0.9``): the batch
    statistics are first blended with an exponential average of earlier *synthesis rounds'*
    statistics, ``mu~ = (1-m) mu(x) + m mu_avg`` (same for the variance), so that the
    images synthesized over many rounds, not each batch alone, match the BN statistics.
    Call :meth:`update_momentum` once per round to fold the last batch into the average.

    ``first_layer_weight`` multiplies the term of the first BatchNorm layer of the model (of
    each member, for an ensemble), whose statistics are the closest to pixel statistics;
    the official DeepInversion ImageNet code uses 10 (``first_bn_multiplier``).
    """

    def __init__(self, model: nn.Module, momentum: float = 0.0, first_layer_weight: float = 1.0):
        self.bn_layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.layer_weights: dict[int, float] = {}
        if float(first_layer_weight) != 1.0:
            for member in getattr(model, "members", None) or [model]:
                first = next((m for m in member.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)), None)
                if first is not None:
                    self.layer_weights[id(first)] = float(first_layer_weight)
        self.layer_losses: list[torch.Tensor] = []
        self.momentum = float(momentum)
        self.averages: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._last: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.sample_masks: dict[int, torch.Tensor] = {}
        self.enabled = True  # False: forward passes outside capture() cost nothing
        self._handles = [m.register_forward_hook(self._hook) for m in self.bn_layers]

    def __len__(self) -> int:
        return len(self.bn_layers)

    def _hook(self, module, inputs, output):
        if not self.enabled:
            return
        x = inputs[0].float()
        key = id(module)
        dims = [0] + list(range(2, x.dim()))
        mask = self.sample_masks.get(key)
        present = None
        if mask is None:
            var, mean = torch.var_mean(x, dim=dims, unbiased=False)
        else:  # statistics over the masked samples only (no host sync when the mask is empty)
            weight = mask.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
            count = weight.sum() * (x[0, 0].numel() if x.dim() > 2 else 1)
            present = (count > 0).to(x.dtype)
            count = count.clamp_min(1.0)
            mean = (x * weight).sum(dims) / count
            shape = [1, -1] + [1] * (x.dim() - 2)
            var = (((x - mean.view(shape)) ** 2) * weight).sum(dims) / count
        if self.momentum > 0:
            self._last[key] = (mean.detach(), var.detach())
            if key in self.averages:
                avg_mean, avg_var = self.averages[key]
                mean = (1 - self.momentum) * mean + self.momentum * avg_mean
                var = (1 - self.momentum) * var + self.momentum * avg_var
        loss = bn_statistics_loss(mean, var, module.running_mean.float(), module.running_var.float())
        if key in self.layer_weights:
            loss = loss * self.layer_weights[key]
        self.layer_losses.append(loss if present is None else loss * present)

    def set_sample_masks(self, masks: dict[int, torch.Tensor] | None) -> None:
        """Per-layer boolean sample masks, keyed by ``id(bn_layer)`` (``None``: whole batch)."""
        self.sample_masks = dict(masks or {})

    @contextlib.contextmanager
    def capture(self, masks: dict[int, torch.Tensor] | None = None):
        """Record the statistics of the forward passes inside the block only (with optional
        sample masks); synthesizers set ``enabled = False`` so that the teacher's other
        forward passes (relabelling student batches) skip the statistics."""
        was_enabled, self.enabled = self.enabled, True
        self.reset()
        self.set_sample_masks(masks)
        try:
            yield self
        finally:
            self.enabled = was_enabled
            self.sample_masks = {}

    def update_momentum(self) -> None:
        """Fold the statistics of the last forward pass into the running averages."""
        m = self.momentum
        for key, (mean, var) in self._last.items():
            if key in self.averages:
                avg_mean, avg_var = self.averages[key]
                self.averages[key] = (m * avg_mean + (1 - m) * mean, m * avg_var + (1 - m) * var)
            else:
                self.averages[key] = (mean, var)
        self._last = {}

    def state_dict(self) -> list:
        """The momentum averages, in BN-layer order (for checkpoints)."""
        return [self.averages.get(id(m)) for m in self.bn_layers]

    def load_state_dict(self, state: list, device=None) -> None:
        self.averages = {}
        for module, entry in zip(self.bn_layers, state):
            if entry is not None:
                self.averages[id(module)] = tuple(t.to(device) if device is not None else t for t in entry)

    def reset(self) -> None:
        self.layer_losses = []

    def loss(self) -> torch.Tensor:
        if not self.layer_losses:
            raise RuntimeError("BNStatisticsHook.loss() called before any forward pass")
        total = torch.stack(self.layer_losses).sum()
        self.layer_losses = []
        return total

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def member_sample_masks(teacher: nn.Module, targets: torch.Tensor) -> dict[int, torch.Tensor] | None:
    """For a :class:`dfkd.ensemble.TeacherEnsemble`, the sample masks of
    :meth:`BNStatisticsHook.set_sample_masks`: each BatchNorm layer of member ``t`` gets
    ``target in C_t``. ``None`` for a single teacher (every layer sees the whole batch)."""
    members = getattr(teacher, "members", None)
    if members is None or not hasattr(teacher, "index"):
        return None
    masks = {}
    for i, member in enumerate(members):
        known = torch.zeros(teacher.num_classes, dtype=torch.bool, device=targets.device)
        known[teacher.index(i).to(targets.device)] = True
        mask = known[targets]
        for module in member.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                masks[id(module)] = mask
    return masks

"""DeepInversion's BatchNorm-statistics regulariser, recorded by forward hooks.

:class:`BNStatisticsHook` compares each BatchNorm layer's batch statistics with its running
statistics; :func:`member_sample_masks` restricts each member of a teacher ensemble to the
images of its own classes.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from dfkd.core.collective import global_mean_var
from dfkd.core.losses import bn_statistics_loss
from dfkd.core.taps import bn_layers, is_ensemble, members


class BNStatisticsHook:
    """DeepInversion's feature-distribution regulariser over every BatchNorm layer.

    On each forward pass, for each ``nn.BatchNorm1d/2d`` in eval mode, compares the batch
    mean and (biased) variance of the layer's input with its running statistics
    (:func:`dfkd.core.losses.bn_statistics_loss`). ``loss()`` returns the sum over layers of the
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

    ``global_moments`` (under ``torchrun``): the batch moments are those of every process's
    batch together (:func:`dfkd.core.collective.global_mean_var`, differentiable), as one
    process holding the global batch would see them; otherwise each rank's own share.
    """

    def __init__(self, model: nn.Module, momentum: float = 0.0, first_layer_weight: float = 1.0,
                 global_moments: bool = False):
        self.bn_layers = bn_layers(model)
        self.layer_weights: dict[int, float] = {}
        if float(first_layer_weight) != 1.0:
            for member in members(model):
                first = next(iter(bn_layers(member)), None)
                if first is not None:
                    self.layer_weights[id(first)] = float(first_layer_weight)
        self.layer_losses: list[torch.Tensor] = []
        self.momentum = float(momentum)
        self.global_moments = bool(global_moments)  # moments over every process's batch (torchrun)
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
        if mask is None and self.global_moments:
            mean, var = global_mean_var(x, dims)
        elif mask is None:
            var, mean = torch.var_mean(x, dim=dims, unbiased=False)
        else:  # statistics over the masked samples only (no host sync when the mask is empty)
            weight = mask.to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1)))
            count = weight.sum() * (x[0, 0].numel() if x.dim() > 2 else 1)
            present = (count > 0).to(x.dtype)
            count = count.clamp_min(1.0)
            mean = (x * weight).sum(dims) / count
            shape = [1, -1] + [1] * (x.dim() - 2)
            var = (((x - mean.view(shape)) ** 2) * weight).sum(dims) / count
        if self.momentum > 0:
            seen_now = torch.ones((), dtype=torch.bool, device=x.device) if present is None else present > 0
            self._last[key] = (mean.detach(), var.detach(), seen_now)
            if key in self.averages:  # blend only with an average that holds a recorded batch
                avg_mean, avg_var, seen = self.averages[key]
                m = self.momentum * seen.to(x.dtype)
                mean = (1 - m) * mean + m * avg_mean
                var = (1 - m) * var + m * avg_var
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
        """Fold the statistics of the last forward pass into the running averages.

        A layer that saw no image in that pass (an ensemble member none of whose classes was
        targeted) keeps its average: its empty statistics are not folded in as zeros."""
        m = self.momentum
        for key, (mean, var, present) in self._last.items():
            if key in self.averages:
                avg_mean, avg_var, seen = self.averages[key]
                # first recorded batch: take it; later ones: blend; an empty batch: keep the average
                w_new = torch.where(seen, torch.full_like(mean, 1 - m), torch.ones_like(mean))
                blend_mean = (1 - w_new) * avg_mean + w_new * mean
                blend_var = (1 - w_new) * avg_var + w_new * var
                self.averages[key] = (torch.where(present, blend_mean, avg_mean),
                                      torch.where(present, blend_var, avg_var), seen | present)
            else:
                self.averages[key] = (mean, var, present)
        self._last = {}

    def state_dict(self) -> list:
        """The momentum averages, in BN-layer order (for checkpoints): ``(mean, var, seen)``."""
        return [self.averages.get(id(m)) for m in self.bn_layers]

    def load_state_dict(self, state: list) -> None:
        """Averages from :meth:`state_dict`, each on its layer's device."""
        self.averages = {}
        for module, entry in zip(self.bn_layers, state):
            if entry is None:
                continue
            entry = tuple(t.to(module.running_mean.device) for t in entry)  # a placed member's own device
            if len(entry) == 2:  # states written before the ``seen`` flag: every average held a batch
                entry = (*entry, torch.ones((), dtype=torch.bool, device=entry[0].device))
            self.averages[id(module)] = entry

    def reset(self) -> None:
        self.layer_losses = []

    def loss(self, device: torch.device | None = None) -> torch.Tensor:
        """The recorded layers' losses summed on ``device`` (default: the first layer's); layers
        of ensemble members placed on other devices are gathered there."""
        if not self.layer_losses:
            raise RuntimeError("BNStatisticsHook.loss() called before any forward pass")
        device = device or self.layer_losses[0].device
        total = torch.stack([loss.to(device) for loss in self.layer_losses]).sum()
        self.layer_losses = []
        return total

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def member_sample_masks(teacher: nn.Module, targets: torch.Tensor) -> dict[int, torch.Tensor] | None:
    """For a :class:`dfkd.multi.ensemble.TeacherEnsemble`, the sample masks of
    :meth:`BNStatisticsHook.set_sample_masks`: each BatchNorm layer of member ``t`` gets
    ``target in C_t``. ``None`` for a single teacher (every layer sees the whole batch)."""
    if not is_ensemble(teacher):
        return None
    masks = {}
    for i, member in enumerate(members(teacher)):
        known = torch.zeros(teacher.num_classes, dtype=torch.bool, device=targets.device)
        known[teacher.index(i).to(targets.device)] = True
        mask = known[targets]
        for module in bn_layers(member):
            masks[id(module)] = mask
    return masks

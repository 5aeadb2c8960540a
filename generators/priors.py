"""BN-statistics priors: other trained models of the same input domain whose BatchNorm
statistics the synthesized images must match as well as the teacher's.

DeepInversion (Yin et al., CVPR 2020) and Fast (Fang et al., AAAI 2022) make the images'
feature statistics match the teacher's BatchNorm running statistics,

    L_bn(x; f) = sum_l ||mu_l(x) - mu_l^BN||_2 + ||s2_l(x) - s2_l^BN||_2,

summed over the BN layers ``l`` of the network ``f`` (:class:`dfkd.core.bn.BNStatisticsHook`).
A *prior* is a further network ``g_k`` trained on the same kind of images (a zoo member; its
classes need not be the teacher's): the inversion adds

    L_bn_prior(x) = sum_k L_bn(x; g_k)

with the method's own ``bn_weight`` (and Fast's momentum over rounds), while the one-hot,
adversarial and KD terms stay the teacher's. The priors only say what the *data* look like.

On Fashion-MNIST, a ResNet-8 and a second LeNet-5-BN trained on the same data as the LeNet-5
teacher lift Fast's LeNet-5-half student from 81.43 +- 0.08% to 83.08 +- 0.72% (seeds 0-2;
``benchmarks/RESULTS.md``, row ``best-zoo``). A second LeNet-5 alone did not help: the
statistics of another architecture constrain the images in ways the teacher's own do not.
This is an extension of the package, not part of either paper.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from dfkd.core.bn import BNStatisticsHook
from teachers import freeze


class BNPriorError(ValueError):
    """A prior model that cannot serve (no BatchNorm layers)."""


class BNPriors:
    """The BN-statistics hooks of a list of frozen prior models.

    :meth:`loss` runs every prior on the (already augmented) images the teacher saw and
    returns ``sum_k L_bn(x; g_k)`` (a zero tensor when there are no priors);
    :meth:`update_momentum`, :meth:`state_dict` and :meth:`load_state_dict` mirror
    :class:`dfkd.core.bn.BNStatisticsHook` for all of them at once.
    """

    def __init__(self, models: Sequence[nn.Module], method: str, momentum: float = 0.0, first_layer_weight: float = 1.0):
        self.models = [freeze(model) for model in models]  # running statistics stay put
        self.hooks: list[BNStatisticsHook] = []
        for k, model in enumerate(self.models):
            hook = BNStatisticsHook(model, momentum=momentum, first_layer_weight=first_layer_weight)
            hook.enabled = False
            if len(hook) == 0:
                self.close()
                hook.close()
                raise BNPriorError(
                    f"{method}: BN prior {k + 1} ({type(getattr(model, 'net', model)).__name__}) has no BatchNorm layers, "
                    "so it has no statistics to match; use a checkpoint of an architecture with BatchNorm "
                    "(lenet5_bn, resnet8, ...)")
            self.hooks.append(hook)

    def __len__(self) -> int:
        return len(self.models)

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """``sum_k L_bn(images; g_k)``; gradients flow to ``images``, not to the priors."""
        total = images.new_zeros((), dtype=torch.float32)
        for model, hook in zip(self.models, self.hooks):
            with hook.capture():
                model(images)
            total = total + hook.loss()
        return total

    def update_momentum(self) -> None:
        for hook in self.hooks:
            hook.update_momentum()

    def state_dict(self) -> list:
        return [hook.state_dict() for hook in self.hooks]

    def load_state_dict(self, state: list | None) -> None:
        if state is None:  # a checkpoint written before BN priors existed
            return
        if len(state) != len(self.hooks):
            raise BNPriorError(f"the checkpoint holds the statistics of {len(state)} BN priors, this run has "
                               f"{len(self.hooks)}; resume with the same bn_priors")
        for hook, entry in zip(self.hooks, state):
            hook.load_state_dict(entry)

    def close(self) -> None:
        for hook in self.hooks:
            hook.close()
        self.hooks = []

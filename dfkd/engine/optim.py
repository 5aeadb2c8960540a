"""How the student is optimised: the engine owns it.

A run's config carries ``student_optimizer``, ``student_lr``, ``student_weight_decay``,
``student_momentum``, ``student_schedule`` and ``student_grad_clip``. A key left unset
(``None``) takes the method's recipe (:attr:`generators.base.Synthesizer.student_recipe`,
the student settings of the method's paper), so ``dfkd distill --method dafl`` trains the
student as DAFL's paper does and ``--student-lr 0.05`` changes only the rate.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from dfkd.core.options import OptionError, check_type
from dfkd.core.schedule import learning_rate_factor

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("cosine", "step", "constant")


@dataclass
class StudentOptim:
    """The student's optimiser (``adam``, or ``sgd`` with Nesterov momentum), its weight
    decay, learning-rate schedule (``cosine`` to 0, ``step`` x0.1 at 50% and 75%, or
    ``constant``) and gradient clipping (l2 norm; 0: off)."""

    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "cosine"
    grad_clip: float = 0.0

    @classmethod
    def resolve(cls, recipe: dict, config: dict) -> "StudentOptim":
        """The method's ``recipe`` (keys without the ``student_`` prefix) overridden by the run
        config's ``student_*`` keys that are set."""
        values = {**asdict(cls()), **recipe}
        for key in values:
            given = config.get(f"student_{key}")
            if given is not None:
                values[key] = check_type(f"student_{key}", given, values[key], OptionError)
        optim = cls(**values)
        if optim.optimizer not in OPTIMIZERS:
            raise OptionError(f"unknown student optimizer {optim.optimizer!r}; use one of: {', '.join(OPTIMIZERS)}")
        if optim.schedule not in SCHEDULES:
            raise OptionError(f"unknown student schedule {optim.schedule!r}; use one of: {', '.join(SCHEDULES)}")
        if optim.lr <= 0:
            raise OptionError(f"student_lr must be above 0, got {optim.lr}")
        return optim

    def as_config(self) -> dict:
        """The resolved ``student_*`` keys of a run config."""
        return {f"student_{key}": value for key, value in asdict(self).items()}

    def build(self, parameters) -> torch.optim.Optimizer:
        parameters = list(parameters)
        if self.optimizer == "adam":
            return torch.optim.Adam(parameters, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(parameters, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                               nesterov=True)

    def lr_factor(self, step: int, total: int) -> float:
        return learning_rate_factor(self.schedule, step, total)

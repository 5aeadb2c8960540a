"""The configs the Python API takes: one dataclass per job, whose field defaults are the one
tree of defaults that the command line, YAML files and ``key=value`` overrides layer onto.

Precedence, lowest first: these defaults < ``--config FILE`` < explicit flags < overrides.
Method options (the synthesizer's own hyperparameters) go under ``options``; their defaults
are the method's (``generators``), merged key by key.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from dfkd.config import merge_config


def _plain_paths(layer: dict | None) -> dict | None:
    """A layer with path objects as strings (configs are written as YAML)."""
    if not layer:
        return layer
    def plain(value):
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value
    return {key: plain(value) for key, value in layer.items()}


class _Layered:
    """What every job config shares: defaults as a dict, construction from layers, and back."""

    @classmethod
    def defaults(cls) -> dict:
        """Every key with its default value (a fresh copy)."""
        out = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            else:
                out[f.name] = f.default_factory()
        return out

    @classmethod
    def from_layers(cls, *layers: dict | None):
        """Merge mappings over the defaults (unknown keys and wrong types are a
        :class:`dfkd.config.ConfigError` naming the key)."""
        return cls(**merge_config(cls.defaults(), *(_plain_paths(layer) for layer in layers)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes):
        """A copy with ``changes`` applied through the same checks as a layer."""
        return type(self).from_layers(self.to_dict(), changes)


@dataclass
class TeacherConfig(_Layered):
    """Supervised training of a teacher on a real data set (``dfkd train-teacher``)."""

    dataset: str = "digits"
    arch: str = "lenet5_bn"
    classes: Any = None  # a subset such as "0-4" or [0, 2, 5]; None: all
    epochs: int = 15
    batch_size: int = 128
    optimizer: Any = None  # None: the architecture's recipe (teachers.default_recipe)
    lr: Any = None
    weight_decay: Any = None
    augment: str = "crop"
    seed: int = 0
    device: str = "auto"
    data_root: Any = None
    download: bool = False
    image_size: Any = None
    out: Any = None


@dataclass
class RunConfig(_Layered):
    """What a distillation run takes, from one teacher or from a zoo."""

    method: str = "dafl"
    student: str = "lenet5_half"
    steps: int = 1000
    batch_size: Any = None  # None: the method's
    seed: int = 0
    device: str = "auto"
    out: Any = None
    eval_dataset: Any = None  # None: the teacher's data set
    data_root: Any = None
    download: bool = False
    no_eval: bool = False
    eval_every: int = 0  # 0: only at the end
    log_every: int = 50
    checkpoint_every: int = 0  # 0: only at the end
    student_ema: float = 0.0
    samples: int = 512
    # the student's optimiser (dfkd.engine.optim.StudentOptim); None: the method's recipe
    student_optimizer: Any = None
    student_lr: Any = None
    student_weight_decay: Any = None
    student_momentum: Any = None
    student_schedule: Any = None
    student_grad_clip: Any = None
    bn_priors: list = field(default_factory=list)
    options: dict = field(default_factory=dict)


@dataclass
class DistillConfig(RunConfig):
    """Data-free distillation of one teacher checkpoint (``dfkd.distill``)."""

    teacher: Any = None


@dataclass
class AmalgamateConfig(RunConfig):
    """Distillation of a teacher zoo into one student over the union of its classes
    (``dfkd.amalgamate``)."""

    zoo: Any = None
    combine: str = "mean_prob"
    combine_options: dict = field(default_factory=dict)
    features: Any = None
    layers: Any = None
    feature_weight: float = 1.0
    feature_options: dict = field(default_factory=dict)
    student_loss: str = "combiner"
    dataset: Any = None
    allow_mixed: bool = False
    class_map: Any = None
    real_limit: int = 0

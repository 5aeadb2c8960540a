"""The configs the Python API takes: one dataclass per job, whose field defaults are the one
tree of defaults that the command line, YAML files and ``key=value`` overrides layer onto.

Precedence, lowest first: these defaults < ``--config FILE`` < explicit flags < overrides.
Method options (the synthesizer's own hyperparameters) go under ``options``; their defaults
are the method's (``generators``), merged key by key.

Layers keep every value given, zeros included. :meth:`validate` (called by every job before
any work is done) refuses numbers that make no sense (``steps: 0``, a negative interval,
``student_ema: 1``, a learning rate of 0 ...) with a :class:`dfkd.config.ConfigError` naming the
key.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from dfkd.config import ConfigError, merge_config
from dfkd.core.options import check_type
from dfkd.knowledge.terms import parse_knowledge
from generators import list_synthesizers, synthesizer_class
from teachers.device import check_precision

# what a number must be: (test, how to say it)
_AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
_NOT_NEGATIVE = (lambda v: v >= 0, "0 or more")
_POSITIVE = (lambda v: v > 0, "above 0")
_FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")
#: method options (under ``options:``) with a range, checked when given; other ``*_weight``
#: options must be 0 or more
OPTION_RANGES = {
    "batch_size": _AT_LEAST_1, "synthesis_batch_size": _AT_LEAST_1, "student_steps_per_round": _AT_LEAST_1,
    "iterations": _AT_LEAST_1, "nz": _AT_LEAST_1, "ngf": _AT_LEAST_1, "pool_size": _AT_LEAST_1,
    "temperature": _POSITIVE, "adi_temperature": _POSITIVE, "lr": _POSITIVE, "lr_z": _POSITIVE,
    "generator_lr": _POSITIVE,
}


def _check_range(key: str, value, rule, note: str = "") -> None:
    test, said = rule
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return  # a wrong type is the type rule's to report
    if (isinstance(value, float) and not math.isfinite(value)) or not test(value):
        raise ConfigError(f"{key} must be {said}, got {value!r}{note}")


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
        return cls(**merge_config(cls.defaults(), *(_plain_paths(layer) for layer in layers),
                                  item_types=cls.item_types()))

    @classmethod
    def item_types(cls) -> dict:
        """``{list key: the types its entries may have}`` for the keys that take more than strings
        (a field's ``metadata={"items": ...}``)."""
        return {f.name: f.metadata["items"] for f in dataclasses.fields(cls) if "items" in f.metadata}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    #: ``key: (test, how to say it)`` for the numbers of this job (``None`` passes)
    ranges: dict = {}

    def validate(self):
        """Check every key's type and range (:class:`dfkd.config.ConfigError` naming the
        first bad key); returns the config."""
        defaults = type(self).defaults()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
            value = check_type(f.name, value, defaults[f.name], ConfigError, items=f.metadata.get("items", (str,)))
            setattr(self, f.name, value)
            if f.name in self.ranges:
                _check_range(f.name, value, self.ranges[f.name])
        return self

    def replace(self, **changes):
        """A copy with ``changes`` applied through the same checks as a layer."""
        return type(self).from_layers(self.to_dict(), changes)


@dataclass
class TeacherConfig(_Layered):
    """Supervised training of a teacher on a real data set (``dfkd train-teacher``)."""

    ranges = {"epochs": _AT_LEAST_1, "batch_size": _AT_LEAST_1, "lr": _POSITIVE, "weight_decay": _NOT_NEGATIVE,
              "image_size": _AT_LEAST_1}

    dataset: str = "digits"
    arch: str = "lenet5_bn"
    classes: Any = None  # a subset such as "0-4" or [0, 2, 5]; None: all
    epochs: int = 15
    batch_size: int = 128
    optimizer: Any = None  # None: the architecture's recipe (teachers.default_recipe)
    lr: Any = None
    weight_decay: Any = None
    augment: str = "crop"
    schedule: str = "cosine"  # the learning rate: cosine (annealed over all steps) or constant
    seed: int = 0
    device: str = "auto"
    data_root: Any = None
    download: bool = False
    image_size: Any = None
    record_metadata: bool = False  # store activation records in the checkpoint (needed by method lopes)
    out: Any = None


@dataclass
class RunConfig(_Layered):
    """What a distillation run takes, from one teacher or from a zoo."""

    ranges = {"steps": _AT_LEAST_1, "batch_size": _AT_LEAST_1, "eval_every": _NOT_NEGATIVE,
              "log_every": _NOT_NEGATIVE, "checkpoint_every": _NOT_NEGATIVE, "checkpoint_seconds": _NOT_NEGATIVE,
              "student_ema": _FRACTION, "samples": _AT_LEAST_1, "student_lr": _POSITIVE,
              "student_weight_decay": _NOT_NEGATIVE, "student_momentum": _FRACTION, "student_grad_clip": _NOT_NEGATIVE,
              "feature_weight": _NOT_NEGATIVE, "real_limit": _NOT_NEGATIVE, "peers": _AT_LEAST_1,
              "peer_weight": _NOT_NEGATIVE}

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
    checkpoint_every: int = 0  # 0: by time only (checkpoint_seconds)
    checkpoint_seconds: float = 300.0  # save the state at most this long apart (at round ends); 0: only at the end
    student_ema: float = 0.0
    samples: int = 512
    # the student's optimiser (dfkd.engine.optim.StudentOptim); None: the method's recipe
    student_optimizer: Any = None
    student_lr: Any = None
    student_weight_decay: Any = None
    student_momentum: Any = None
    student_schedule: Any = None
    student_grad_clip: Any = None
    precision: str = "auto"  # auto (bf16 on CUDA only), fp32, bf16, fp16 (teachers.device)
    channels_last: bool = False  # the student in channels-last memory format
    transfer_set: Any = None  # images for real / dfnd: a folder of images or shards (streamed), or a data set's name
    bn_priors: list = field(default_factory=list)
    # forms of knowledge added to the student's loss (dfkd.knowledge.terms): NAME, NAME:WEIGHT or {name, weight, options}
    knowledge: list = field(default_factory=list, metadata={"items": (str, dict)})
    # deep mutual learning (dfkd.knowledge.peers): the student and peers - 1 peers learn from each other
    peers: int = 1  # the cohort's size; 1: off
    peer_arch: Any = None  # None: the student's architecture
    peer_weight: float = 1.0  # the weight of each network's mutual term (the paper's: 1)
    options: dict = field(default_factory=dict)

    def validate(self):
        super().validate()
        check_precision(self.precision)
        parse_knowledge(self.knowledge)
        if self.peer_arch and self.peers < 2:
            raise ConfigError(f"peer_arch {self.peer_arch!r} is the architecture of peers: give peers >= 2 "
                              "(the cohort's size, the student included) or drop peer_arch")
        if self.transfer_set and not synthesizer_class(self.method).takes_images:
            users = ", ".join(n for n in list_synthesizers() if synthesizer_class(n).takes_images)
            raise ConfigError(f"a transfer set is read by the methods that learn from given images ({users}), "
                              f"not by {self.method!r}")
        for key, value in (self.options or {}).items():
            if key in OPTION_RANGES:
                _check_range(f"options.{key}", value, OPTION_RANGES[key])
            elif key.endswith("_weight"):
                _check_range(f"options.{key}", value, _NOT_NEGATIVE, " (a weight; 0 drops its term)")
        return self


@dataclass
class DistillConfig(RunConfig):
    """Data-free distillation of one teacher checkpoint (``dfkd.distill``)."""

    teacher: Any = None


@dataclass
class AmalgamateConfig(RunConfig):
    """Distillation of a teacher zoo into one student over the union of its classes
    (``dfkd.amalgamate``)."""

    zoo: Any = None
    # "auto": chosen from the members' class sets (dfkd.multi.combine.resolve_combine); a run's
    # config.yaml records the resolved name
    combine: str = "auto"
    combine_options: dict = field(default_factory=dict)
    # "auto", "per-member" or "shared" (dfkd.multi.per_member); config.yaml records the resolved one
    synthesis: str = "auto"
    synthesis_options: dict = field(default_factory=dict)  # per-member settings (dfkd.multi.per_member.DEFAULTS)
    features: Any = None
    layers: Any = None
    feature_weight: float = 1.0
    feature_options: dict = field(default_factory=dict)
    student_loss: str = "combiner"
    dataset: Any = None
    allow_mixed: bool = False
    # the members' devices (dfkd.multi.placement): "cuda:0,cuda:1" or a list, member i on entry i mod n;
    # None: every member on the run's device
    member_devices: Any = None
    class_map: Any = None
    real_limit: int = 0

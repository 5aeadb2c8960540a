"""The synthesizer interface, its registry and the parts every method shares.

A synthesizer turns a frozen teacher (a single model or an ensemble; anything that maps
``[0,1]`` images to logits) and the current student into batches of ``[0,1]`` images:

- :meth:`Synthesizer.synthesize` runs one *synthesis round* (a generator update, or the
  optimisation of a fresh batch of images) and returns its named loss terms;
- :meth:`Synthesizer.sample` returns a :class:`SyntheticBatch` for one student step;
- :meth:`Synthesizer.student_losses` returns the student's named loss terms on that batch
  (KD at temperature ``T`` unless the method says otherwise).

The engine calls ``synthesize`` once every ``student_steps_per_round`` student steps. Methods
are registered with ``@register_synthesizer("name")``; their paper defaults live in the class
attribute ``defaults`` and every option can be overridden by keyword.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from dfkd.core.bn import BNStatisticsHook
from dfkd.core.losses import kd_loss
from dfkd.core.options import check_type
from generators.priors import BNPriors
from teachers.device import autocast, check_precision
from teachers.registry import Registry, name_class

#: run settings that are not method options (the engine owns the student's optimiser)
STUDENT_RUN_KEYS = ("student_optimizer", "student_lr", "student_weight_decay", "student_momentum", "student_schedule",
                    "student_grad_clip")


@contextlib.contextmanager
def seeded(seed: int):
    """Random draws inside the block (e.g. a generator's initial weights) come from ``seed``;
    the global random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


class UnknownSynthesizerError(ValueError):
    """An unknown method name."""


class SynthesizerOptionError(ValueError):
    """An option a method does not accept, or a teacher the method cannot use."""


#: Every data-free method by name (``@register_synthesizer("dafl")``).
SYNTHESIZERS: Registry[type["Synthesizer"]] = Registry("method", UnknownSynthesizerError, on_register=name_class)


def register_synthesizer(name: str) -> Callable[[type], type]:
    """Class decorator: make a :class:`Synthesizer` subclass available under ``name``."""
    return SYNTHESIZERS.register(name)


def list_synthesizers() -> list[str]:
    return SYNTHESIZERS.names()


def synthesizer_class(name: str) -> type["Synthesizer"]:
    return SYNTHESIZERS.get(name)


def create_synthesizer(name: str, teacher: nn.Module, **kwargs) -> "Synthesizer":
    """Build the synthesizer registered as ``name`` (see :func:`list_synthesizers`)."""
    return synthesizer_class(name)(teacher, **kwargs)


@dataclass
class SyntheticBatch:
    """Images in ``[0,1]`` for one student step, with the teacher's logits when the
    synthesizer already computed them on exactly these images (else ``None``)."""

    images: torch.Tensor
    teacher_logits: torch.Tensor | None = None


def teacher_stats(teacher: nn.Module, channels: int):
    """The teacher's input mean/std (from its normalisation wrapper), or 0.5/0.5."""
    mean = getattr(teacher, "mean", None)
    std = getattr(teacher, "std", None)
    if isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor) and mean.numel() == channels:
        return mean.detach().flatten().cpu(), std.detach().flatten().cpu()
    return torch.full((channels,), 0.5), torch.full((channels,), 0.5)


def bn_statistics_hook(teacher: nn.Module, method: str, bn_weight: float, momentum: float = 0.0,
                       first_layer_weight: float = 1.0, global_moments: bool = False) -> BNStatisticsHook:
    """The BN-statistics hook of an inversion method, recording only inside
    :meth:`BNStatisticsHook.capture` (the teacher's relabelling passes skip it). A teacher
    without BatchNorm is refused unless the term is dropped (``bn_weight=0``)."""
    hook = BNStatisticsHook(teacher, momentum=momentum, first_layer_weight=first_layer_weight,
                            global_moments=global_moments)
    hook.enabled = False
    if len(hook) == 0 and bn_weight != 0:
        hook.close()
        raise SynthesizerOptionError(
            f"{method}: the teacher has no BatchNorm layers, so the BN-statistics term has nothing to match. "
            "Use a teacher with BatchNorm (e.g. lenet5_bn) or drop the term explicitly with bn_weight=0 "
            "(--bn-weight 0 on the command line)."
        )
    return hook


def random_jitter_flip(images: torch.Tensor, max_shift: int, flip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """DeepInversion's input augmentation: one random roll of up to ``max_shift`` pixels in
    each direction for the whole batch, then (if ``flip``) a horizontal flip with p=0.5."""
    if max_shift > 0:
        dx, dy = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist()
        images = torch.roll(images, shifts=(dx, dy), dims=(2, 3))
    if flip and torch.rand((), generator=generator).item() < 0.5:
        images = torch.flip(images, dims=(3,))
    return images


def augment_batch(images: torch.Tensor, pad: int = 2, flip: bool = True) -> torch.Tensor:
    """Per-sample random crop (zero padding ``pad``) and horizontal flip, batched on the
    images' device without host synchronisation (used when the student trains on a pool)."""
    n, _, h, w = images.shape
    if pad > 0:
        padded = nn.functional.pad(images, (pad, pad, pad, pad))
        # integer offsets per sample, gathered with an index grid
        off_y = torch.randint(0, 2 * pad + 1, (n, 1, 1), device=images.device)
        off_x = torch.randint(0, 2 * pad + 1, (n, 1, 1), device=images.device)
        rows = (torch.arange(h, device=images.device).view(1, h, 1) + off_y).expand(n, h, w)
        cols = (torch.arange(w, device=images.device).view(1, 1, w) + off_x).expand(n, h, w)
        batch_idx = torch.arange(n, device=images.device).view(n, 1, 1).expand(n, h, w)
        images = padded.permute(0, 2, 3, 1)[batch_idx, rows, cols].permute(0, 3, 1, 2)
    if flip:
        mask = torch.rand(n, 1, 1, 1, device=images.device) < 0.5
        images = torch.where(mask, images.flip(3), images)
    return images.contiguous()


def mix_batch(images: torch.Tensor, alpha: float) -> torch.Tensor:
    """Mixup of a batch with a shuffled copy of itself: ``lam x_i + (1 - lam) x_perm(i)``,
    ``lam ~ Beta(alpha, alpha)`` per sample, on the images' device."""
    n = images.shape[0]
    beta = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha)))
    lam = beta.sample((n,)).to(images.device).view(n, 1, 1, 1)
    perm = torch.randperm(n, device=images.device)
    return lam * images + (1 - lam) * images[perm]


class Synthesizer:
    """Base class of every data-free method. Subclasses set ``defaults`` (the paper's
    hyperparameters) and implement :meth:`synthesize` and :meth:`sample`.

    Common options (every method accepts them):

    - ``batch_size``: images per student step;
    - ``temperature``: KD temperature of the student loss;
    - ``student_steps_per_round``: student steps per synthesis round.

    ``student_recipe`` is the student's optimiser as the method's paper trains it (keys
    ``optimizer``, ``lr``, ``weight_decay``, ``momentum``, ``schedule``, ``grad_clip``). It is a
    recommendation, not an option: the engine owns the student's optimiser
    (:class:`dfkd.engine.optim.StudentOptim`) and a run's ``student_*`` settings override it.

    ``bn_priors`` (not an option: frozen models, see :mod:`generators.priors`) are further
    networks of the same input domain whose BatchNorm statistics the images must match too;
    only methods with ``uses_bn_statistics = True`` accept them.
    """

    name = "base"
    common_defaults: dict = {
        "batch_size": 256,
        "temperature": 1.0,
        "student_steps_per_round": 1,
    }
    defaults: dict = {}
    #: the student's optimiser in the method's paper (see the class docstring)
    student_recipe: dict = {}
    #: whether the method matches BatchNorm statistics (and so can use ``bn_priors``)
    uses_bn_statistics = False
    #: whether the method learns from given images (``images=``: real, or wild ones to select from)
    takes_images = False
    #: constructor arguments a run takes from the teacher checkpoint's meta: ``{argument: meta key}``
    #: (e.g. lopes's activation records)
    teacher_meta_arguments: dict = {}

    def __init__(self, teacher: nn.Module, image_shape, num_classes: int, device="cpu", seed: int = 0,
                 bn_priors: Sequence[nn.Module] = (), precision: str = "auto", **options):
        self.teacher = teacher
        self.precision = check_precision(precision)
        self.bn_prior_models = list(bn_priors or ())
        if self.bn_prior_models and not self.uses_bn_statistics:
            users = ", ".join(n for n in list_synthesizers() if synthesizer_class(n).uses_bn_statistics)
            raise SynthesizerOptionError(
                f"method {self.name!r} does not match BatchNorm statistics, so BN priors (--bn-prior) would do nothing; "
                f"use one of: {users}")
        self.image_shape = tuple(int(v) for v in image_shape)
        self.num_classes = int(num_classes)
        self.device = torch.device(device)
        self.options = self.resolve_options(options)
        self.batch_size = int(self.options["batch_size"])
        self.temperature = float(self.options["temperature"])
        self.student_steps_per_round = int(self.options["student_steps_per_round"])
        self.rng = torch.Generator().manual_seed(int(seed))
        self.images_synthesized = 0

    # -- options ---------------------------------------------------------------------------
    @classmethod
    def all_defaults(cls) -> dict:
        merged = dict(cls.common_defaults)
        if cls.uses_bn_statistics:  # under torchrun: match the global batch's moments (dfkd.core.collective)
            merged["bn_global_moments"] = False
        merged.update(cls.defaults)
        return merged

    @classmethod
    def student_batch_images(cls, options: dict) -> int:
        """Images in one student batch under the resolved ``options`` (what the memory check counts)."""
        return int(options.get("batch_size") or 0)

    @classmethod
    def resolve_options(cls, options: dict) -> dict:
        merged = cls.all_defaults()
        unknown = sorted(set(options) - set(merged))
        run_settings = [k for k in unknown if k in STUDENT_RUN_KEYS]
        if run_settings:
            raise SynthesizerOptionError(
                f"{', '.join(run_settings)} belong to the run, not to the method's options: give them at the top "
                f"level of the config (e.g. {run_settings[0]}: ...) or as --{run_settings[0].replace('_', '-')}")
        if unknown:
            raise SynthesizerOptionError(
                f"method {cls.name!r} does not accept option(s) {', '.join(unknown)}; "
                f"accepted: {', '.join(sorted(merged))}"
            )
        for key, value in options.items():
            if value is not None:
                merged[key] = check_type(f"option {key!r} of {cls.name!r}", value, merged[key], SynthesizerOptionError)
        return merged

    # -- helpers ---------------------------------------------------------------------------
    def autocast(self):
        """The run's precision on this synthesizer's device (:func:`teachers.device.autocast`)."""
        return autocast(self.device, self.precision)

    def build_bn_priors(self, momentum: float = 0.0, first_layer_weight: float = 1.0) -> BNPriors:
        """The hooks of this run's ``bn_priors`` (:class:`generators.priors.BNPriors`), with
        the method's BN momentum and first-layer weight; refused when the BN term is off."""
        if self.bn_prior_models and not self.options.get("bn_weight"):
            raise SynthesizerOptionError(f"{self.name}: BN priors were given but bn_weight is 0, so their term would "
                                         "be multiplied by 0; drop --bn-prior or set bn_weight above 0")
        return BNPriors(self.bn_prior_models, self.name, momentum=momentum, first_layer_weight=first_layer_weight)

    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.autocast():
            return self.teacher(images).float()

    # -- the interface ---------------------------------------------------------------------
    def attach_student(self, student: nn.Module) -> None:
        """Called once by the engine with the student (methods that tap its features use it)."""

    def plan(self, total_student_steps: int) -> None:
        """Called once by the engine with the run's length in student steps (methods whose
        own schedules span the run read it here)."""

    def extra_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters the engine optimises together with the student (e.g. feature
        adapters); known after :meth:`attach_student`. None by default."""
        return []

    def synthesize(self, student: nn.Module) -> dict[str, torch.Tensor]:
        """One synthesis round; returns named, detached loss terms (tensors, no sync)."""
        raise NotImplementedError("abstract: subclasses implement synthesize()")

    def sample(self) -> SyntheticBatch:
        """Images (and, when known, teacher logits) for one student step."""
        raise NotImplementedError("abstract: subclasses implement sample()")

    def preview(self, n: int) -> torch.Tensor:
        """``n`` synthesized images for plots and quality metrics (no training)."""
        images, got = [], 0
        with torch.no_grad():
            while got < n:
                batch = self.sample().images.detach()
                images.append(batch)
                got += batch.shape[0]
        return torch.cat(images)[:n]

    def student_losses(self, student: nn.Module, batch: SyntheticBatch) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Named student losses on ``batch``, plus student and teacher logits.

        Default: ``{"kd": T^2 KL(p_T^T || p_S^T)}`` (:func:`dfkd.core.losses.kd_loss`)."""
        teacher_logits = batch.teacher_logits if batch.teacher_logits is not None else self.teacher_logits(batch.images)
        with self.autocast():
            student_logits = student(batch.images).float()
        return {"kd": kd_loss(student_logits, teacher_logits, self.temperature)}, student_logits, teacher_logits

    def state_dict(self) -> dict:
        return {"rng": self.rng.get_state(), "images_synthesized": self.images_synthesized}

    def load_state_dict(self, state: dict) -> None:
        self.rng.set_state(state["rng"])
        self.images_synthesized = int(state["images_synthesized"])

    def describe(self) -> dict:
        return {"method": self.name, **self.options}


class PlannedBank(Synthesizer):
    """A synthesizer that makes its whole bank in planned batches before the student learns
    from it (ZSKD's Data Impressions, Lopes's reconstructions): a subclass sets ``self.pool``
    (an :class:`~generators.pool.ImagePool`), counts ``self.batches_done`` and keeps ``self.last_terms``, the
    terms of its latest batch; this class saves and restores the three."""

    def state_dict(self):
        state = super().state_dict()
        state.update(pool=self.pool.state_dict(), batches_done=self.batches_done,
                     last_terms={k: v.cpu() for k, v in self.last_terms.items()})
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.pool.load_state_dict(state["pool"], self.device)
        self.batches_done = int(state["batches_done"])
        self.last_terms = {k: v.to(self.device) for k, v in state.get("last_terms", {}).items()}

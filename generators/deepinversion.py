"""DeepInversion and Adaptive DeepInversion (Yin et al., CVPR 2020, arXiv:1912.08795)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dfkd.core.bn import member_sample_masks
from dfkd.core.losses import adi_competition_loss, l2_prior, total_variation_l1, total_variation_l2
from generators.base import (
    Synthesizer,
    SynthesizerOptionError,
    SyntheticBatch,
    augment_batch,
    bn_statistics_hook,
    mix_batch,
    random_jitter_flip,
    register_synthesizer,
    teacher_stats,
)
from generators.pool import ImagePool


def cosine_with_warmup(base_lr: float, step: int, total: int, warmup: int) -> float:
    """The official DeepInversion ``lr_cosine_policy``: ``base_lr * (step + 1) / warmup`` for
    the first ``warmup`` steps, then ``0.5 * (1 + cos(pi * (step - warmup) / (total - warmup))) * base_lr``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * base_lr


@register_synthesizer("deepinversion")
class DeepInversion(Synthesizer):
    """Images optimised directly from noise until the teacher's BatchNorm statistics and
    its prediction of sampled target classes are matched.

    Objective for a batch ``x`` with targets ``y`` (paper Eq. 3-8)::

        L(x) = CE(f_T(x~), y)
             + w_bn   * sum_l ||mu_l(x~) - mu_l^BN||_2 + ||s2_l(x~) - s2_l^BN||_2
             + w_tv2  * TV_l2(x~) + w_tv1 * TV_l1(x~) + w_l2 * ||x~||_2
             + w_adi  * (1 - JS(p_S(x~), p_T(x~)))            (ADI only, T=3)

    where ``x~`` is ``x`` randomly jittered (roll of up to 2 px) and flipped. ``x`` is a
    parameter in the teacher's normalised space, initialised with N(0,1) (as the paper's
    ``randn`` inputs), optimised with Adam and clipped after each step so that pixels stay in
    [0,1]. Targets cycle through the classes (balanced batches) unless ``random_labels``.

    Each synthesis round optimises one fresh batch for ``iterations`` steps and adds it to a
    FIFO pool of ``pool_size`` images; the student then takes ``student_steps_per_round``
    KD steps on random, augmented (crop + flip) batches from the pool, re-labelled by the
    teacher each time. Defaults follow the official CIFAR-10 recipe (batch 256, 2000
    iterations, Adam lr 0.05, ``w_bn=10``, ``w_tv2=2.5e-5``, ``w_l2=0``) and the ImageNet
    ADI weight 0.2. A teacher without BatchNorm is refused unless ``bn_weight=0``.
    ``first_bn_weight`` multiplies the first BN layer's term: 1 in the CIFAR code, 10 in the
    official ImageNet code (``first_bn_multiplier``).

    Extension (off by default, not in the paper): ``student_mixup = alpha > 0`` mixes each
    student batch with a shuffled copy of itself, ``x = lam x_i + (1-lam) x_j`` with
    ``lam ~ Beta(alpha, alpha)`` per sample (Zhang et al., ICLR 2018). The teacher labels the
    mixed image itself, so the mixture is a new, valid KD input between two synthesized
    ones; it multiplies what each expensive inversion buys.

    Extension for teacher ensembles (off by default; nothing changes for one teacher):
    ``ensemble_bn_by_target`` matches each member's BN statistics on the images targeted at
    its own classes only (:func:`dfkd.core.bn.member_sample_masks`), since a member trained on
    classes 0-4 holds the statistics of those images only. Measured on the digits
    amalgamation test (two disjoint-half teachers, 120 steps): 19% with it against 60%
    without, so the paper's whole-batch matching stays the default.

    ImageNet schedule (the official ``setting_id=0``, multi-resolution): with
    ``low_res_iterations > 0`` a batch is first optimised for that many steps while the teacher
    sees it average-pooled to half its side (2,000 steps at 112 px for 224 px images), then for
    ``iterations`` steps at full size (1,000), each phase with a fresh Adam
    (``adam_betas``: ``"0.5,0.9"`` in that code) and, with ``lr_schedule: cosine``, a learning
    rate warmed up linearly over ``lr_warmup`` steps and then annealed to 0 (the official
    ``lr_cosine_policy``); the jitter is divided by the pooling factor in the low-resolution
    phase. ``configs/imagenet/deepinversion.yaml`` is that recipe.

    Extension (none by default): ``bn_priors``, other networks of the same input domain whose
    BN-statistics term ``L_bn_prior`` joins the objective with weight ``bn_weight``
    (:mod:`generators.priors`).
    """

    uses_bn_statistics = True
    defaults = {
        "synthesis_batch_size": 256,
        "iterations": 2000,
        "low_res_iterations": 0,
        "lr": 0.05,
        "adam_betas": "0.9,0.999",
        "lr_schedule": "constant",
        "lr_warmup": 100,
        "bn_weight": 10.0,
        "first_bn_weight": 1.0,
        "tv_l2_weight": 2.5e-5,
        "tv_l1_weight": 0.0,
        "l2_weight": 0.0,
        "jitter": 2,
        "flip": True,
        "random_labels": False,
        "adi": False,
        "adi_weight": 0.2,
        "adi_temperature": 3.0,
        "pool_size": 20000,
        "ensemble_bn_by_target": False,
        "student_augment": True,
        "student_mixup": 0.0,
        "batch_size": 256,
        "student_steps_per_round": 50,
        "temperature": 1.0,
    }
    student_recipe = {
        "optimizer": "sgd",
        "lr": 0.05,
        "weight_decay": 5e-4,
        "schedule": "cosine",
    }

    def __init__(self, teacher, image_shape, num_classes, device="cpu", seed=0, **options):
        super().__init__(teacher, image_shape, num_classes, device, seed, **options)
        o = self.options
        self.bn_hook = bn_statistics_hook(teacher, "deepinversion", o["bn_weight"], first_layer_weight=o["first_bn_weight"],
                                          global_moments=o["bn_global_moments"])
        self.bn_priors = self.build_bn_priors(first_layer_weight=o["first_bn_weight"])
        mean, std = teacher_stats(teacher, self.image_shape[0])
        self.pixel_mean = mean.view(1, -1, 1, 1).to(self.device)
        self.pixel_std = std.view(1, -1, 1, 1).to(self.device)
        if o["lr_schedule"] not in ("constant", "cosine"):
            raise SynthesizerOptionError(f"deepinversion: lr_schedule must be constant or cosine, got {o['lr_schedule']!r}")
        try:
            self.adam_betas = tuple(float(b) for b in str(o["adam_betas"]).split(","))
            assert len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas)
        except (ValueError, AssertionError):
            raise SynthesizerOptionError(f"deepinversion: adam_betas must be two numbers in [0, 1) such as "
                                         f"\"0.5,0.9\", got {o['adam_betas']!r}") from None
        self.pool = ImagePool(o["pool_size"])
        self._next_target = 0
        self.last_targets: torch.Tensor | None = None

    def sample_targets(self, n: int) -> torch.Tensor:
        if self.options["random_labels"]:
            return torch.randint(0, self.num_classes, (n,), generator=self.rng)
        targets = (torch.arange(n) + self._next_target) % self.num_classes
        self._next_target = (self._next_target + n) % self.num_classes
        return targets

    def to_pixels(self, v: torch.Tensor) -> torch.Tensor:
        return self.pixel_mean + self.pixel_std * v

    def objective(self, v: torch.Tensor, targets: torch.Tensor, student, masks=None,
                  pool: int = 1) -> dict[str, torch.Tensor]:
        """Named, unweighted terms of the inversion objective for parameters ``v``; ``masks``
        are per-member BN sample masks (``None``: BN statistics of the whole batch); ``pool``
        > 1 shows the teacher the images average-pooled by that factor (low-resolution phase)."""
        o = self.options
        x = self.to_pixels(v)
        if pool > 1:
            x = F.avg_pool2d(x, pool)
        x = random_jitter_flip(x, o["jitter"] // pool, o["flip"], self.rng)
        with self.bn_hook.capture(masks), self.autocast():
            logits = self.teacher(x).float()
        terms = {"ce": F.cross_entropy(logits, targets)}
        terms["bn"] = self.bn_hook.loss(logits.device) if len(self.bn_hook) else logits.new_zeros(())
        if len(self.bn_priors):  # other zoo members' BN statistics (generators.priors)
            with self.autocast():
                terms["bn_prior"] = self.bn_priors.loss(x)
        # priors are computed only when weighted (each costs a pass over the batch)
        for name, prior in (("tv_l2", total_variation_l2), ("tv_l1", total_variation_l1), ("l2", l2_prior)):
            if o[f"{name}_weight"]:
                terms[name] = prior(x)
        if o["adi"] and student is not None:
            with self.autocast():
                student_logits = student(x).float()
            terms["adi"] = adi_competition_loss(student_logits, logits, o["adi_temperature"])
        return terms

    def weighted_total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        o = self.options
        weights = {"ce": 1.0, "bn": o["bn_weight"], "bn_prior": o["bn_weight"], "tv_l2": o["tv_l2_weight"], "tv_l1": o["tv_l1_weight"],
                   "l2": o["l2_weight"], "adi": o["adi_weight"]}
        return sum(weights[name] * value for name, value in terms.items())

    def invert(self, student, n: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Optimise one fresh batch; returns pixels in [0,1] and the final terms."""
        o = self.options
        n = n or o["synthesis_batch_size"]
        targets = self.sample_targets(n).to(self.device)
        masks = member_sample_masks(self.teacher, targets) if o["ensemble_bn_by_target"] else None
        v = torch.randn((n, *self.image_shape), generator=self.rng).to(self.device).requires_grad_(True)
        low = (0.0 - self.pixel_mean) / self.pixel_std
        high = (1.0 - self.pixel_mean) / self.pixel_std
        was_training = student.training if student is not None else False
        if student is not None:
            student.eval()
            student.requires_grad_(False)
        try:
            with torch.no_grad():
                v.copy_(torch.max(torch.min(v, high), low))
            phases = ([(2, o["low_res_iterations"])] if o["low_res_iterations"] else []) + [(1, o["iterations"])]
            for pool, iterations in phases:
                optimizer = torch.optim.Adam([v], lr=o["lr"], betas=self.adam_betas)
                for step in range(iterations):
                    if o["lr_schedule"] == "cosine":
                        optimizer.param_groups[0]["lr"] = cosine_with_warmup(o["lr"], step, iterations, o["lr_warmup"])
                    terms = self.objective(v, targets, student, masks, pool=pool)
                    total = self.weighted_total(terms)
                    optimizer.zero_grad(set_to_none=True)
                    total.backward()
                    optimizer.step()
                    with torch.no_grad():
                        v.copy_(torch.max(torch.min(v, high), low))
        finally:
            if student is not None:
                student.requires_grad_(True)
                student.train(was_training)
        self.last_targets = targets
        return self.to_pixels(v.detach()).clamp(0, 1), {k: t.detach() for k, t in terms.items()}

    def synthesize(self, student):
        images, terms = self.invert(student)
        self.pool.add(images)
        self.images_synthesized += images.shape[0]
        return {f"inv_{k}": v for k, v in terms.items()}

    def sample(self):
        images = self.pool.sample(self.batch_size, self.rng)
        if self.options["student_augment"]:
            images = augment_batch(images)
        if self.options["student_mixup"] > 0:
            images = mix_batch(images, self.options["student_mixup"])
        return SyntheticBatch(images)

    def state_dict(self):
        state = super().state_dict()
        state.update(pool=self.pool.state_dict(), next_target=self._next_target)
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.pool.load_state_dict(state["pool"], self.device)
        self._next_target = int(state["next_target"])

"""Adversarial generator methods: ZSKT (adversarial belief matching) and DFAD.

Both train a generator to produce images on which the student disagrees with the teacher,
and several student steps on fresh generator samples per generator step.
"""
from __future__ import annotations

import math

import torch

from dfkd.core.losses import attention_transfer_loss, kl_teacher_student, logit_l1
from dfkd.core.schedule import cosine_factor
from dfkd.core.taps import FeatureTap, block_paths
from generators.base import Synthesizer, SyntheticBatch, register_synthesizer, seeded, teacher_stats
from generators.networks import DCGANGenerator


class AdversarialGeneratorSynthesizer(Synthesizer):
    """Shared machinery: a :class:`DCGANGenerator`, its Adam optimiser (optionally cosine
    annealed over ``generator_total_steps``), and the adversarial generator step
    ``min_G -D(T(G(z)), S(G(z)))`` for the method's discrepancy ``D``."""

    defaults = {"nz": 100, "ngf": 64, "generator_lr": 1e-3, "generator_schedule": "cosine", "generator_total_steps": 0,
                "generator_grad_clip": 0.0}

    def __init__(self, teacher, image_shape, num_classes, device="cpu", seed=0, **options):
        super().__init__(teacher, image_shape, num_classes, device, seed, **options)
        o = self.options
        mean, std = teacher_stats(teacher, self.image_shape[0])
        with seeded(seed):
            self.generator = DCGANGenerator(o["nz"], self.image_shape, o["ngf"], mean, std).to(self.device)
        self.generator_optimizer = torch.optim.Adam(self.generator.parameters(), lr=o["generator_lr"])
        self.generator_steps = 0
        self.generator_total_steps = int(o["generator_total_steps"])

    def discrepancy(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("abstract: subclasses define the discrepancy the generator maximises")

    def latents(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.options["nz"], generator=self.rng).to(self.device)

    def generate(self, n: int) -> torch.Tensor:
        return self.generator(self.latents(n))

    def plan(self, total_student_steps: int) -> None:
        """``generator_total_steps`` 0 (the default) spans the run: one generator step per round."""
        if not self.options["generator_total_steps"]:
            self.generator_total_steps = math.ceil(total_student_steps / self.student_steps_per_round)

    def _set_generator_lr(self):
        o = self.options
        total = o["generator_total_steps"] or self.generator_total_steps
        if o["generator_schedule"] == "cosine" and total > 0:
            for group in self.generator_optimizer.param_groups:
                group["lr"] = o["generator_lr"] * cosine_factor(self.generator_steps, total)

    def synthesize(self, student):
        self.generator.train()
        self._set_generator_lr()
        self.round_latents = self.latents(self.batch_size)
        images = self.generator(self.round_latents)
        student.requires_grad_(False)
        try:
            with self.autocast():
                teacher_logits = self.teacher(images).float()
                student_logits = student(images).float()
            gap = self.discrepancy(student_logits, teacher_logits)
            self.generator_optimizer.zero_grad(set_to_none=True)
            (-gap).backward()
            if self.options["generator_grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(self.generator.parameters(), self.options["generator_grad_clip"])
            self.generator_optimizer.step()
        finally:
            student.requires_grad_(True)
        self.generator_steps += 1
        self.images_synthesized += self.batch_size
        return {"gen_discrepancy": gap.detach()}

    def sample(self):
        with torch.no_grad():
            images = self.generate(self.batch_size)
        self.images_synthesized += self.batch_size
        return SyntheticBatch(images)

    def state_dict(self):
        state = super().state_dict()
        state.update(
            generator=self.generator.state_dict(),
            generator_optimizer=self.generator_optimizer.state_dict(),
            generator_steps=self.generator_steps,
        )
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.generator.load_state_dict(state["generator"])
        self.generator_optimizer.load_state_dict(state["generator_optimizer"])
        self.generator_steps = int(state["generator_steps"])


@register_synthesizer("zskt")
class ZSKT(AdversarialGeneratorSynthesizer):
    """Zero-shot knowledge transfer via adversarial belief matching (Micaelli & Storkey,
    NeurIPS 2019, arXiv:1905.09768).

    Generator: ``max_G D(T(G(z)), S(G(z)))``. Student, ``n_s`` steps per generator step::

        L_S = D + beta * sum_l mean (a_S,l - a_T,l)^2

    with spatial attention maps ``a = normalize(mean_c f^2)`` of matching blocks (the
    teacher's and student's ``block_paths``) and ``D = KL(p_T || p_S) / K``: the official
    code's ``F.kl_div`` with its default ``reduction="mean"`` averages over the ``N x K``
    elements, i.e. the per-sample KL divided by the number of classes ``K``, which sets the
    attention term's weight relative to it (``kl_per_class=False``: the per-sample KL).
    Paper and official-code defaults: batch 128, ``nz=100``, Adam lr 1e-3 (generator) and 2e-3
    (student), both cosine annealed, gradients clipped to norm 5 (``generator_grad_clip``,
    ``student_grad_clip``), 1 generator and 10 student steps per iteration, ``beta=250``.
    As in the official ``LearnableLoader``, the student steps of an iteration all train on one
    batch: the iteration's latents through the updated generator, relabelled once by the
    teacher (``repeat_batch``; ``False``: a fresh batch for every student step).
    The official generator ends in ``BatchNorm(affine=False)`` without DAFL's ``tanh``; this
    one keeps the ``tanh`` (:class:`generators.networks.DCGANGenerator`).
    """

    defaults = {
        **AdversarialGeneratorSynthesizer.defaults,
        "batch_size": 128,
        "student_steps_per_round": 10,
        "generator_grad_clip": 5.0,
        "at_beta": 250.0,
        "kl_per_class": True,
        "repeat_batch": True,
    }
    student_recipe = {
        "optimizer": "adam",
        "lr": 2e-3,
        "schedule": "cosine",
        "grad_clip": 5.0,
    }

    _taps = None
    _round_batch: SyntheticBatch | None = None  # repeat_batch: this iteration's student batch
    _round_teacher_features: dict | None = None  # and the teacher's block outputs on it

    def attach_student(self, student):
        """Pair the teacher's and student's block outputs for attention transfer."""
        if self.options["at_beta"] <= 0:
            return
        t_paths, s_paths = list(block_paths(self.teacher)), list(block_paths(student))
        n = min(len(t_paths), len(s_paths))
        if n == 0:
            self._taps = None
            return
        # pair the last n blocks of each, in order
        self.block_pairs = list(zip(t_paths[-n:], s_paths[-n:]))
        self._taps = (
            FeatureTap(self.teacher, [t for t, _ in self.block_pairs]),
            FeatureTap(student, [s for _, s in self.block_pairs]),
        )

    def discrepancy(self, student_logits, teacher_logits):
        kl = kl_teacher_student(student_logits, teacher_logits)
        return kl / teacher_logits.shape[1] if self.options["kl_per_class"] else kl

    def synthesize(self, student):
        terms = super().synthesize(student)
        if self.options["repeat_batch"]:  # relabel the iteration's batch once, features included
            with torch.no_grad():
                images = self.generator(self.round_latents)
            self._round_batch = SyntheticBatch(images, self.teacher_logits(images))
            self._round_teacher_features = self._teacher_block_features()
            self.images_synthesized += self.batch_size
        return terms

    def _teacher_block_features(self) -> dict | None:
        """The teacher's block outputs of its latest forward pass (``None`` without attention)."""
        return {t: self._taps[0][t].detach() for t, _ in self.block_pairs} if self._taps is not None else None

    def sample(self):
        return self._round_batch if self._round_batch is not None else super().sample()

    def student_losses(self, student, batch):
        if batch is self._round_batch:
            teacher_logits, teacher_features = batch.teacher_logits, self._round_teacher_features
        else:
            teacher_logits = self.teacher_logits(batch.images)
            teacher_features = self._teacher_block_features()
        with self.autocast():
            student_logits = student(batch.images).float()
        losses = {"kl": self.discrepancy(student_logits, teacher_logits)}
        if teacher_features is not None:
            s_tap = self._taps[1]
            at = sum(attention_transfer_loss(s_tap[s], teacher_features[t]) for t, s in self.block_pairs)
            losses["attention"] = self.options["at_beta"] * at
        return losses, student_logits, teacher_logits


@register_synthesizer("dfad")
class DFAD(AdversarialGeneratorSynthesizer):
    """Data-Free Adversarial Distillation (Fang et al., arXiv:1912.11006, 2019).

    The discrepancy is the mean absolute difference of the logits,
    ``D = mean |z_T - z_S|``: the generator maximises it, the student minimises it
    (``L_S = D``, also on logits) with 5 student steps per generator step on fresh samples.
    Defaults follow the official CIFAR script: batch 256, ``nz=256``, generator Adam lr 1e-3,
    student SGD lr 0.1, momentum 0.9, weight decay 5e-4. The official LeNet-5 -> LeNet-5-Half
    script (``DFAD_mnist.py``) uses batch 512, ``nz=100``, student lr 0.01 and weight decay
    1e-4 with a constant lr: ``configs/{mnist,fashion-mnist,digits}/dfad.yaml`` use those.
    """

    defaults = {
        **AdversarialGeneratorSynthesizer.defaults,
        "nz": 256,
        "batch_size": 256,
        "student_steps_per_round": 5,
    }
    student_recipe = {
        "optimizer": "sgd",
        "lr": 0.1,
        "weight_decay": 5e-4,
        "schedule": "cosine",
    }

    def discrepancy(self, student_logits, teacher_logits):
        return logit_l1(student_logits, teacher_logits)

    def student_losses(self, student, batch):
        teacher_logits = self.teacher_logits(batch.images)
        with self.autocast():
            student_logits = student(batch.images).float()
        return {"l1": logit_l1(student_logits, teacher_logits)}, student_logits, teacher_logits

"""DAFL: Data-Free Learning of Student Networks (Chen et al., ICCV 2019, arXiv:1904.01186)."""
from __future__ import annotations

import torch

from dfkd.core.losses import activation_loss, information_entropy_loss, one_hot_loss
from dfkd.core.taps import fc_input_tap, penultimate_tap
from generators.base import (
    Synthesizer,
    SynthesizerOptionError,
    SyntheticBatch,
    register_synthesizer,
    seeded,
    teacher_stats,
)
from generators.networks import DCGANGenerator


@register_synthesizer("dafl")
class DAFL(Synthesizer):
    """A generator trained so that the teacher treats its images like real data.

    Generator loss (paper Eq. 7)::

        L_G = alpha_oh * CE(z_T, argmax z_T)                  (one-hot loss)
            + alpha_a  * (-mean |f_T|)                         (activation loss)
            + alpha_ie * sum_k pbar_k log10 pbar_k             (information entropy, pbar = mean softmax)

    with ``f_T`` the teacher's features before its fully connected layers and the entropy in
    ``log10``, both as in the official code (``activation_features="fc_input"``,
    ``entropy_log_base=10``). The penultimate features and the natural log remain options
    (``activation_features="penultimate"``, ``entropy_log_base=2.718281828``); the natural log
    weighs the entropy term 2.3x as much.

    and the student learns from the teacher's outputs on each generated batch with
    ``KL(p_T || p_S)`` (DAFL's ``kdloss``, T=1). Order as in the official code: each
    iteration draws ``z``, updates the generator once and the student once on the same batch
    (detached). Defaults are the paper's MNIST settings: batch 512, ``nz=100``, Adam with
    lr 0.2 for the generator and 2e-3 for the student, ``alpha_oh=1, alpha_ie=5,
    alpha_a=0.1``; the official schedule is 200 epochs x 120 iterations.
    """

    defaults = {
        "batch_size": 512,
        "nz": 100,
        "ngf": 64,
        "generator_lr": 0.2,
        "one_hot_weight": 1.0,
        "activation_weight": 0.1,
        "information_entropy_weight": 5.0,
        "student_steps_per_round": 1,
        "activation_features": "fc_input",
        "entropy_log_base": 10.0,
    }
    student_recipe = {
        "optimizer": "adam",
        "lr": 2e-3,
        "schedule": "constant",
    }

    def __init__(self, teacher, image_shape, num_classes, device="cpu", seed=0, **options):
        super().__init__(teacher, image_shape, num_classes, device, seed, **options)
        mean, std = teacher_stats(teacher, self.image_shape[0])
        with seeded(seed):
            self.generator = DCGANGenerator(self.options["nz"], self.image_shape, self.options["ngf"], mean, std).to(self.device)
        self.generator_optimizer = torch.optim.Adam(self.generator.parameters(), lr=self.options["generator_lr"])
        taps = {"fc_input": fc_input_tap, "penultimate": penultimate_tap}
        if self.options["activation_features"] not in taps:
            raise SynthesizerOptionError(f"dafl: activation_features must be one of {sorted(taps)}, "
                                         f"not {self.options['activation_features']!r}")
        if self.options["entropy_log_base"] <= 1:
            raise SynthesizerOptionError("dafl: entropy_log_base must be greater than 1 (10 as in the official code)")
        self.features = taps[self.options["activation_features"]](teacher)
        self._batch: SyntheticBatch | None = None

    def generator_losses(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        with self.autocast():
            logits = self.teacher(images).float()
        features = self.features[self.features.paths[0]]
        return {
            "one_hot": one_hot_loss(logits),
            "activation": activation_loss(features),
            "information_entropy": information_entropy_loss(logits, base=self.options["entropy_log_base"]),
        }, logits

    def synthesize(self, student):
        o = self.options
        self.generator.train()
        z = torch.randn(self.batch_size, o["nz"], generator=self.rng).to(self.device)
        images = self.generator(z)
        terms, logits = self.generator_losses(images)
        total = (
            o["one_hot_weight"] * terms["one_hot"]
            + o["activation_weight"] * terms["activation"]
            + o["information_entropy_weight"] * terms["information_entropy"]
        )
        self.generator_optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.generator_optimizer.step()
        self._batch = SyntheticBatch(images.detach(), logits.detach())
        self.images_synthesized += self.batch_size
        return {f"gen_{k}": v.detach() for k, v in terms.items()}

    def sample(self):
        if self._batch is None:  # e.g. right after a resume: a fresh batch, no generator update
            with torch.no_grad():
                images = self.generator(torch.randn(self.batch_size, self.options["nz"], generator=self.rng).to(self.device))
            self._batch = SyntheticBatch(images, self.teacher_logits(images))
        return self._batch

    def preview(self, n):
        with torch.no_grad():
            z = torch.randn(n, self.options["nz"], generator=self.rng).to(self.device)
            return torch.cat([self.generator(chunk) for chunk in z.split(self.batch_size)])

    def state_dict(self):
        state = super().state_dict()
        state.update(generator=self.generator.state_dict(), generator_optimizer=self.generator_optimizer.state_dict())
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.generator.load_state_dict(state["generator"])
        self.generator_optimizer.load_state_dict(state["generator_optimizer"])

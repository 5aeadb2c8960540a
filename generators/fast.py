"""Fast data-free distillation with a meta-learned generator ("Fast", Fang et al., AAAI 2022,
arXiv:2112.06253, "Up to 100x Faster Data-free Knowledge Distillation")."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from dfkd.core.bn import member_sample_masks
from dfkd.core.losses import agreement_masked_kl
from generators.base import (
    Synthesizer,
    SynthesizerOptionError,
    SyntheticBatch,
    augment_batch,
    bn_statistics_hook,
    mix_batch,
    register_synthesizer,
    seeded,
)
from generators.networks import DCGANGenerator
from generators.pool import ImagePool


@register_synthesizer("fast")
class Fast(Synthesizer):
    """Fast: a *meta* generator whose weights are a good starting point for inverting any new
    batch, so each batch needs only a few (``iterations``, Fast-2/5/10) optimisation steps
    instead of DeepInversion's thousands; what it synthesizes is kept in a memory bank
    (``pool_size``, FIFO).

    One synthesis round (paper Alg. 1, official ``fast_meta``):

    1. clone the meta generator ``G_theta`` into ``G_phi``; draw ``z ~ N(0, I)`` (a parameter)
       and random targets ``y``;
    2. for ``iterations`` steps minimise, over ``phi`` (Adam, ``lr``) and ``z`` (``lr_z``),
       betas (0.5, 0.999)::

           L = w_bn * sum_l ||mu_l~ - mu_l^BN||_2 + ||s2_l~ - s2_l^BN||_2     (BN statistics)
             + w_oh * CE(f_T(A(x)), y)                                       (one-hot)
             - w_adv * mean_i 1[argmax S = argmax T] KL(p_T || p_S)(A(x))   (adversarial)

       with ``x = G_phi(z)`` in ``[0,1]``, ``A`` a random crop (zero padding ``crop_pad``)
       and flip, and ``mu~``/``s2~`` the batch statistics blended with the earlier rounds'
       (``bn_momentum``, see :class:`dfkd.core.bn.BNStatisticsHook`). The adversarial term is
       off during the first ``warmup_rounds`` rounds;
    3. meta update (first-order MAML): ``theta <- Adam(theta, sum_k grad_phi L_k)`` with
       lr ``lr * iterations``, betas (0.5, 0.999);
    4. the images of the lowest-loss step go into the memory bank.

    The student then takes ``student_steps_per_round`` KD steps (``T^2 KL`` at temperature
    ``temperature``) on random, augmented bank images relabelled by the teacher. Before the
    first student step, ``warmup_rounds`` rounds fill the bank (the paper's warm-up epochs).
    The bank keeps everything the official schedule makes (220 rounds x 256 = 56,320 images).

    Defaults are the official CIFAR Fast-2 run (``--g_steps 2 --lr_g 5e-3 --lr_z 0.015
    --bn 10 --oh 0.4 --adv 1.1 --bn_mmt 0.9 --T 20 --warmup 20``, synthesis batch 256,
    generator ``nz=256, ngf=64``, student SGD lr 0.2, wd 1e-4, cosine). The official scripts'
    ``reset_l0`` (re-initialising the first layer after 120 epochs) is not implemented.

    Extensions (not in the paper): ``student_mixup`` (off by default) as in
    :class:`generators.deepinversion.DeepInversion`; ``class_conditional`` (off by default):
    the generator gets ``z + E[y]`` with a learned (meta-learned) class embedding, so the
    one-hot term can steer each image to its target in a few steps; with a teacher
    ensemble, ``ensemble_bn_by_target`` (off by default) matches each member's BN
    statistics on the images targeted at its own classes (:func:`dfkd.core.bn.member_sample_masks`),
    which only separates the members' images when the generator is class-conditional;
    ``bn_priors`` (none by default; :mod:`generators.priors`): other networks of the same
    input domain add their BN-statistics term, ``L_bn_prior``, with weight ``bn_weight`` and
    the same momentum; ``first_bn_weight`` (1, i.e. off, by default): the first BN layer's
    term is multiplied by it, as in the official DeepInversion ImageNet code (10 there); ``balance_classes`` (off by default): each bank image is filed under the teacher's
    prediction and the student draws classes uniformly (:class:`generators.pool.ImagePool`).
    An unconditional generator does not follow the one-hot targets in two steps, so its bank
    is as unbalanced as what it happens to make (on Fashion-MNIST: 1% ankle boots, 18% coats).
    """

    uses_bn_statistics = True
    defaults = {
        "nz": 256,
        "ngf": 64,
        "synthesis_batch_size": 256,
        "iterations": 2,
        "lr": 5e-3,
        "lr_z": 0.015,
        "bn_weight": 10.0,
        "oh_weight": 0.4,
        "adv_weight": 1.1,
        "bn_momentum": 0.9,
        "first_bn_weight": 1.0,
        "warmup_rounds": 20,
        "ensemble_bn_by_target": False,
        "class_conditional": False,
        "crop_pad": 4,
        "flip": True,
        "meta": True,
        "pool_size": 60000,
        "student_augment": True,
        "student_mixup": 0.0,
        "balance_classes": False,
        "batch_size": 256,
        "temperature": 20.0,
        "student_steps_per_round": 400,
    }
    student_recipe = {
        "optimizer": "sgd",
        "lr": 0.2,
        "weight_decay": 1e-4,
        "schedule": "cosine",
        # not in the paper: a safety margin above the largest student gradient norm of healthy
        # runs (22-23 over 150 steps, digits and Fashion-MNIST teachers); it stops the divergence
        # that KD at T=20 with SGD lr 0.2 and a student without BatchNorm suffers from a confident
        # teacher (a torchvision ResNet-18 with logits up to 30: kd 2.3e37 by step 10, finite with it)
        "grad_clip": 25.0,
    }

    def __init__(self, teacher, image_shape, num_classes, device="cpu", seed=0, **options):
        super().__init__(teacher, image_shape, num_classes, device, seed, **options)
        o = self.options
        if o["iterations"] < 1:
            raise SynthesizerOptionError("fast: iterations must be at least 1")
        self.bn_hook = bn_statistics_hook(teacher, "fast", o["bn_weight"], momentum=o["bn_momentum"],
                                          first_layer_weight=o["first_bn_weight"], global_moments=o["bn_global_moments"])
        self.bn_priors = self.build_bn_priors(momentum=o["bn_momentum"], first_layer_weight=o["first_bn_weight"])
        with seeded(seed):
            self.generator = DCGANGenerator(o["nz"], self.image_shape, o["ngf"], output="sigmoid",
                                            num_classes=self.num_classes if o["class_conditional"] else 0).to(self.device)
        self.meta_optimizer = torch.optim.Adam(self.generator.parameters(), lr=o["lr"] * o["iterations"], betas=(0.5, 0.999))
        self.pool = ImagePool(o["pool_size"])
        self.rounds = 0

    # -- synthesis -------------------------------------------------------------------------
    def inversion_terms(self, images, targets, student, adversarial: bool, masks=None) -> dict[str, torch.Tensor]:
        """Named, unweighted terms of the inversion loss for generated ``images``; ``masks``
        are per-member BN sample masks (``None``: BN statistics of the whole batch)."""
        o = self.options
        seen = augment_batch(images, pad=o["crop_pad"], flip=o["flip"])
        with self.bn_hook.capture(masks), self.autocast():
            teacher_logits = self.teacher(seen).float()
        terms = {"oh": F.cross_entropy(teacher_logits, targets)}
        terms["bn"] = self.bn_hook.loss(teacher_logits.device) if len(self.bn_hook) else teacher_logits.new_zeros(())
        if len(self.bn_priors):
            with self.autocast():
                terms["bn_prior"] = self.bn_priors.loss(seen)
        if adversarial:
            with self.autocast():
                student_logits = student(seen).float()
            terms["adv"] = -agreement_masked_kl(student_logits, teacher_logits)
        return terms

    def weighted_total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        o = self.options
        weights = {"oh": o["oh_weight"], "bn": o["bn_weight"], "bn_prior": o["bn_weight"], "adv": o["adv_weight"]}
        return sum(weights[name] * value for name, value in terms.items())

    def synthesis_round(self, student, adversarial: bool) -> dict[str, torch.Tensor]:
        o = self.options
        n = o["synthesis_batch_size"]
        targets = torch.randint(0, self.num_classes, (n,), generator=self.rng).to(self.device)
        z = torch.randn(n, o["nz"], generator=self.rng).to(self.device).requires_grad_(True)
        fast = copy.deepcopy(self.generator).train()
        optimizer = torch.optim.Adam(
            [{"params": fast.parameters()}, {"params": [z], "lr": o["lr_z"]}], lr=o["lr"], betas=(0.5, 0.999)
        )
        masks = member_sample_masks(self.teacher, targets) if o["ensemble_bn_by_target"] else None
        labels = targets if o["class_conditional"] else None
        meta_grads = [torch.zeros_like(p) for p in self.generator.parameters()]
        best_loss, best_images = None, None
        for _ in range(o["iterations"]):
            images = fast(z, labels)
            terms = self.inversion_terms(images, targets, student, adversarial, masks)
            total = self.weighted_total(terms)
            # keep the lowest-loss batch without a host sync
            if best_loss is None:
                best_loss, best_images = total.detach(), images.detach()
            else:
                better = total.detach() < best_loss
                best_images = torch.where(better, images.detach(), best_images)
                best_loss = torch.minimum(best_loss, total.detach())
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            for acc, p in zip(meta_grads, fast.parameters()):
                if p.grad is not None:
                    acc.add_(p.grad)
            optimizer.step()
        if o["meta"]:
            self.meta_optimizer.zero_grad(set_to_none=True)
            for p, g in zip(self.generator.parameters(), meta_grads):
                p.grad = g
            self.meta_optimizer.step()
        else:  # plain generator training: keep the adapted weights
            self.generator.load_state_dict(fast.state_dict())
        self.bn_hook.update_momentum()
        self.bn_priors.update_momentum()
        best_images = best_images.clamp(0, 1)
        labels = self.teacher_logits(best_images).argmax(1) if o["balance_classes"] else None
        self.pool.add(best_images, labels)
        self.images_synthesized += n
        self.rounds += 1
        return {f"inv_{k}": v.detach() for k, v in terms.items()}

    def synthesize(self, student):
        was_training = student.training
        student.eval()
        student.requires_grad_(False)
        try:
            while self.rounds < self.options["warmup_rounds"]:
                self.synthesis_round(student, adversarial=False)
            terms = self.synthesis_round(student, adversarial=self.options["adv_weight"] > 0)
        finally:
            student.requires_grad_(True)
            student.train(was_training)
        return terms

    # -- student side ----------------------------------------------------------------------
    def sample(self):
        images = self.pool.sample(self.batch_size, self.rng, balanced=self.options["balance_classes"])
        if self.options["student_augment"]:
            images = augment_batch(images, pad=self.options["crop_pad"], flip=self.options["flip"])
        if self.options["student_mixup"] > 0:
            images = mix_batch(images, self.options["student_mixup"])
        return SyntheticBatch(images)

    def preview(self, n):
        if len(self.pool) == 0:
            with torch.no_grad():
                z = torch.randn(n, self.options["nz"], generator=self.rng).to(self.device)
                labels = (torch.arange(n) % self.num_classes).to(self.device) if self.options["class_conditional"] else None
                return self.generator.eval()(z, labels).clamp(0, 1)
        return self.pool.sample(n, self.rng)

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self):
        state = super().state_dict()
        state.update(
            generator=self.generator.state_dict(),
            meta_optimizer=self.meta_optimizer.state_dict(),
            pool=self.pool.state_dict(),
            bn_averages=self.bn_hook.state_dict(),
            bn_prior_averages=self.bn_priors.state_dict(),
            rounds=self.rounds,
        )
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.generator.load_state_dict(state["generator"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.pool.load_state_dict(state["pool"], self.device)
        self.bn_hook.load_state_dict(state["bn_averages"])
        self.bn_priors.load_state_dict(state.get("bn_prior_averages"))
        self.rounds = int(state["rounds"])

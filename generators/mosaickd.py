"""MosaicKD: distillation from out-of-domain data (Fang et al., "Mosaicking to Distill: Knowledge
Distillation from Out-of-Domain Data", NeurIPS 2021, arXiv:2110.15094).

Images of another domain (the *wild* set: ``--transfer-set DIR`` or a data set's name, e.g.
``digits`` for a Fashion-MNIST teacher) share local patterns with the teacher's data even where
their global content differs. A generator ``G`` learns to tile such patterns into images the
teacher takes for its own: a patch discriminator ``D`` (PatchGAN, one logit per local patch)
tells generated patches from wild ones, so ``G``'s images are mosaics of real local patterns,
while the teacher and the student shape their global content.

One round (official ``kd_mosaic.py``, ``train``), with ``x = G(z)`` in ``[0,1]``, ``r`` a batch
of wild images (not augmented), ``N`` images per batch, ``D(.)_p`` the logit of patch ``p``,
``s`` the sigmoid, ``p_T``/``p_S`` the teacher's and student's softmax at temperature 1:

1. discriminator step (Adam), on ``x`` detached::

       L_D = w_local * (1/2N) sum_i sum_p [ -log(1 - s(D(x_i)_p)) - log s(D(r_i)_p) ]

2. generator step (Adam), ``D`` as just updated::

       L_G = w_local * local + w_align * align - w_adv * adv + w_balance * balance
       local   = (1/N) sum_i sum_p -log s(D(x_i)_p)               (Eq. 3: patches pass as wild)
       align   = (1/N) sum_i H(p_T(x_i)) = -(1/N) sum_i sum_k p_ik log p_ik
                                                                  (Eq. 4: the teacher is confident)
       adv     = (1/N) sum_i KL(p_T(x_i) || p_S(x_i))               (Eq. 7: maximised by G)
       balance = sum_k pbar_k log2 pbar_k,  pbar = (1/N) sum_i p_T(x_i)
                                                                  (appendix: classes balanced)

   ``align`` is the official code's per-image entropy (its comment names DAFL's one-hot
   cross-entropy as the alternative); ``balance`` is DAFL's information entropy in bits.
3. ``student_steps_per_round`` student steps, each on a fresh generated batch ``G(z')`` joined
   (``wild_in_student_batch``) by a batch of wild images with crop and flip (the appendix: the
   OOD data is also used for training), with ``kd = T^2 KL(p_T^T || p_S^T)``, ``T = 1``.

Defaults are the official CIFAR-100 (in-domain) / CIFAR-10 (wild) command of the README
(``--local 1 --align 1 --adv 1 --balance 10 --lr 0.1 --batch-size 256 --epochs 200``) and the
script's own defaults: ``z_dim`` 100, generator ``ngf`` 64, patch discriminator ``ndf`` 128, both
Adam lr 1e-3 with betas (0.5, 0.999) and cosine-annealed over the run, 5 student steps per
round; student SGD lr 0.1, momentum 0.9, weight decay 1e-4, cosine; one round per wild batch
(200 epochs x 196 batches of CIFAR-10 = 39,200 rounds, 196,000 student steps). The wild images
for the student are cropped (4 px padding) and flipped, those for ``D`` are not.

Differences from the official code: the generator is the package's sigmoid
:class:`generators.networks.DCGANGenerator` (channels ``2ngf -> 2ngf -> ngf`` where the official
one has ``4ngf -> 2ngf -> ngf``); ``D`` normalises its input with the teacher's mean and std
inside the network (the official code feeds it normalised tensors: the same function); the
``--ood_subset`` selection of the most uncertain ImageNet/Places365 images is not included
(give a transfer set that is already out of domain).

Changed for the CPU budget in ``configs/fashion-mnist/mosaickd.yaml`` (digits as the wild set):
4000 student steps (800 rounds) instead of 196,000; batches of 128 generated + 128 wild images
instead of 256 + 256; ``ngf`` 16 and ``ndf`` 32 instead of 64 and 128; the student's SGD at
lr 0.05 with weight decay 5e-4 (the package's LeNet recipes) instead of lr 0.1 and 1e-4; crops
pad 2 px instead of 4. ``configs/digits/mosaickd.yaml`` is shorter still (300 steps, batches of
64, ``ngf`` 8, ``ndf`` 16).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.core.losses import information_entropy_loss, kl_teacher_student
from dfkd.core.schedule import cosine_factor
from dfkd.data.sampling import ShareBatches, resolve_share
from dfkd.data.types import DatasetError, image_of
from generators.base import (
    Synthesizer,
    SynthesizerOptionError,
    SyntheticBatch,
    augment_batch,
    register_synthesizer,
    seeded,
    teacher_stats,
)
from generators.networks import DCGANGenerator

#: Adam betas of the generator and the discriminator (official code)
ADAM_BETAS = (0.5, 0.999)


class PatchDiscriminator(nn.Module):
    """The official PatchGAN discriminator: ``Conv4x4/2(C, ndf) -> LeakyReLU(0.2) ->
    Conv4x4/2(ndf, 2ndf) -> BN -> LeakyReLU(0.2) -> Conv1x1(2ndf, 1)``, one logit per patch of
    10 x 10 pixels on a grid of ``H/4 x W/4`` (8 x 8 for 32 px images). Inputs are ``[0,1]``
    images, normalised first with ``mean``/``std``. As in the official code, wild and generated
    batches pass through it apart, so its BatchNorm (always in training mode) normalises each on
    its own statistics."""

    def __init__(self, channels: int, ndf: int = 128, mean=None, std=None):
        super().__init__()
        mean = torch.as_tensor(mean if mean is not None else [0.5] * channels, dtype=torch.float32)
        std = torch.as_tensor(std if std is not None else [0.5] * channels, dtype=torch.float32)
        self.register_buffer("mean", mean.reshape(1, channels, 1, 1).clone())
        self.register_buffer("std", std.reshape(1, channels, 1, 1).clone())
        self.body = nn.Sequential(
            nn.Conv2d(channels, ndf, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(ndf, 2 * ndf, 4, 2, 1, bias=False),
            nn.BatchNorm2d(2 * ndf),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * ndf, 1, 1, 1, 0, bias=False),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body((images - self.mean) / self.std)


def patch_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """``(1/2N) sum_i sum_p [-log(1 - s(fake_ip)) - log s(real_ip)]``: binary cross-entropy
    summed over patches, averaged over the ``N`` images of each batch."""
    fake = F.binary_cross_entropy_with_logits(fake_logits.float(), torch.zeros_like(fake_logits.float()), reduction="sum")
    real = F.binary_cross_entropy_with_logits(real_logits.float(), torch.ones_like(real_logits.float()), reduction="sum")
    return (fake + real) / (2 * fake_logits.shape[0])


def patch_realism_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator's local term, ``(1/N) sum_i sum_p -log s(D(x_i)_p)``: its patches pass as wild."""
    logits = fake_logits.float()
    return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="sum") / logits.shape[0]


def prediction_entropy(teacher_logits: torch.Tensor) -> torch.Tensor:
    """The alignment term, ``-(1/N) sum_i sum_k p_ik log p_ik``: low when the teacher is sure."""
    logits = teacher_logits.float()
    return -(F.softmax(logits, dim=1) * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def class_balance(teacher_logits: torch.Tensor) -> torch.Tensor:
    """The balance term, ``sum_k pbar_k log2 pbar_k`` (minimum ``-log2 K``: every class as often)."""
    return information_entropy_loss(teacher_logits, base=2.0)


class ShuffledOrder:
    """Indices ``0..n-1`` in shuffled epochs (a new order when one ends), ``batch_size`` at a time
    (one process; under torchrun each rank takes its share of every epoch instead:
    :class:`dfkd.data.sampling.ShareBatches`)."""

    def __init__(self, n: int, batch_size: int, rng: torch.Generator):
        self.n, self.batch_size, self.rng = int(n), int(batch_size), rng
        self.order: torch.Tensor | None = None
        self.cursor = 0

    def next_batch(self) -> torch.Tensor:
        k, parts = self.batch_size, []
        while k > 0:
            if self.order is None or self.cursor >= self.n:
                self.order, self.cursor = torch.randperm(self.n, generator=self.rng), 0
            part = self.order[self.cursor:self.cursor + k]
            self.cursor += part.numel()
            k -= part.numel()
            parts.append(part)
        return torch.cat(parts)

    def state_dict(self) -> dict:
        return {"order": self.order, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.order, self.cursor = state["order"], int(state["cursor"])


@register_synthesizer("mosaickd")
class MosaicKD(Synthesizer):
    """A generator whose patches pass a patch discriminator as wild images and whose images the
    teacher is sure of, balanced over classes, and where the student still differs; see the
    module docstring.

    ``images``: the wild set, an ``N x C x H x W`` tensor in ``[0, 1]`` (moved to ``device``) or
    a map-style data set of ``C x H x W`` images or ``(image, label)`` pairs, labels unused (e.g.
    :class:`dfkd.data.folder.ImageFolderSet`, read a batch at a time). Options: ``nz``, ``ngf``,
    ``ndf``, ``generator_lr``, ``discriminator_lr``, the four generator weights ``local_weight``
    (also scales ``L_D``; 0 skips the discriminator), ``align_weight``, ``adv_weight``,
    ``balance_weight``, ``wild_in_student_batch``, ``augment``/``pad``/``flip`` (the student's
    wild images).
    """

    takes_images = True
    defaults = {
        "batch_size": 256,
        "temperature": 1.0,
        "student_steps_per_round": 5,
        "nz": 100,
        "ngf": 64,
        "ndf": 128,
        "generator_lr": 1e-3,
        "discriminator_lr": 1e-3,
        "local_weight": 1.0,
        "align_weight": 1.0,
        "adv_weight": 1.0,
        "balance_weight": 10.0,
        "wild_in_student_batch": True,
        "augment": True,
        "pad": 4,
        "flip": True,
    }
    student_recipe = {
        "optimizer": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "schedule": "cosine",
    }

    @classmethod
    def student_batch_images(cls, options: dict) -> int:
        """Generated images plus, with ``wild_in_student_batch``, as many wild ones."""
        return int(options.get("batch_size") or 0) * (2 if options.get("wild_in_student_batch") else 1)

    def __init__(self, teacher, image_shape, num_classes, device="cpu", seed=0, images=None, ranks=None, **options):
        super().__init__(teacher, image_shape, num_classes, device, seed, **options)
        o = self.options
        if o["ndf"] < 1 or o["discriminator_lr"] <= 0 or o["pad"] < 0:
            raise SynthesizerOptionError("method 'mosaickd': ndf must be at least 1, discriminator_lr above 0 and pad 0 or more")
        self.wild, self.streamed = self._checked_wild(images)
        mean, std = teacher_stats(teacher, self.image_shape[0])
        with seeded(seed):
            self.generator = DCGANGenerator(o["nz"], self.image_shape, o["ngf"], output="sigmoid").to(self.device)
            self.discriminator = PatchDiscriminator(self.image_shape[0], o["ndf"], mean, std).to(self.device)
        self.generator_optimizer = torch.optim.Adam(self.generator.parameters(), lr=o["generator_lr"], betas=ADAM_BETAS)
        self.discriminator_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=o["discriminator_lr"],
                                                        betas=ADAM_BETAS)
        try:  # under torchrun (or given ranks): (rank, world_size, shared seed) of the passes over the wild set
            share = resolve_share(ranks, seed, self.device)
        except DatasetError as err:
            raise SynthesizerOptionError(f"method 'mosaickd': {err}") from None
        self.discriminator_order = self._order(share, 0)  # D's real batches
        self.student_order = self._order(share, 1)  # the student's wild batches
        self.rounds, self.total_rounds = 0, 0

    def _checked_wild(self, images):
        """The wild set as given (a data set, streamed) or as a checked tensor on ``device``."""
        if images is None:
            raise SynthesizerOptionError(
                "method 'mosaickd' needs out-of-domain (wild) images: pass --transfer-set DIR or --transfer-set DATASET "
                "(e.g. digits for a Fashion-MNIST teacher), or images=X to create_synthesizer")
        if isinstance(images, torch.utils.data.Dataset) and not isinstance(images, torch.Tensor):
            if len(images) == 0:
                raise SynthesizerOptionError("method 'mosaickd': the wild image set is empty")
            if tuple(image_of(images[0]).shape) != self.image_shape:
                raise SynthesizerOptionError(f"method 'mosaickd': the wild set gives {tuple(image_of(images[0]).shape)} "
                                             f"images, the teacher takes {self.image_shape}")
            return images, True
        images = torch.as_tensor(images)
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape or images.shape[0] == 0:
            raise SynthesizerOptionError(f"method 'mosaickd': the wild images must be a non-empty N x "
                                         f"{' x '.join(map(str, self.image_shape))} tensor, got {tuple(images.shape)}")
        if not images.is_floating_point() or float(images.min()) < 0 or float(images.max()) > 1:
            raise SynthesizerOptionError("method 'mosaickd': the wild images must be floats in [0, 1]")
        return images.to(self.device), False

    # -- batches ---------------------------------------------------------------------------
    def _order(self, share, stream: int):
        """Shuffled epochs over the wild set: this process's own, or this rank's share of passes
        shuffled alike on every rank (``stream`` tells the two orders apart)."""
        if share is None:
            return ShuffledOrder(len(self.wild), self.batch_size, self.rng)
        rank, world_size, seed = share
        return ShareBatches(len(self.wild), self.batch_size, num_replicas=world_size, rank=rank, seed=seed + stream)

    def wild_batch(self, order) -> torch.Tensor:
        """The next ``batch_size`` wild images of ``order``'s epochs."""
        indices = torch.as_tensor(order.next_batch(), dtype=torch.long)
        if self.streamed:
            return torch.stack([image_of(self.wild[i]) for i in indices.tolist()]).to(self.device, non_blocking=True)
        return self.wild[indices.to(self.device)]

    def generate(self, n: int) -> torch.Tensor:
        """``n`` images of the generator (in training mode, as the official code always runs it)."""
        z = torch.randn(n, self.options["nz"], generator=self.rng).to(self.device)
        return self.generator(z)

    # -- the two adversarial steps ---------------------------------------------------------
    def discriminator_step(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """One Adam step of ``D`` on ``w_local * L_D`` (generated ``fake`` vs wild ``real``)."""
        with self.autocast():
            loss = self.options["local_weight"] * patch_discriminator_loss(self.discriminator(real),
                                                                           self.discriminator(fake.detach()))
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.discriminator_optimizer.step()
        return loss.detach()

    def generator_terms(self, images: torch.Tensor, student: nn.Module) -> dict[str, torch.Tensor]:
        """The four unweighted terms of ``L_G`` on generated ``images`` (graphs kept for ``G``)."""
        with self.autocast():
            teacher_logits = self.teacher(images).float()
            student_logits = student(images).float()
            terms = {
                "align": prediction_entropy(teacher_logits),
                "adv": kl_teacher_student(student_logits, teacher_logits),
                "balance": class_balance(teacher_logits),
            }
            if self.options["local_weight"]:
                terms["local"] = patch_realism_loss(self.discriminator(images))
        return terms

    def generator_objective(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """``L_G = w_local local + w_align align - w_adv adv + w_balance balance``."""
        o = self.options
        total = o["align_weight"] * terms["align"] - o["adv_weight"] * terms["adv"] + o["balance_weight"] * terms["balance"]
        if "local" in terms:
            total = total + o["local_weight"] * terms["local"]
        return total

    def generator_step(self, images: torch.Tensor, student: nn.Module) -> dict[str, torch.Tensor]:
        """One Adam step of ``G`` on ``L_G`` (the student and ``D`` frozen for it); its terms."""
        student.requires_grad_(False)
        self.discriminator.requires_grad_(False)
        try:
            terms = self.generator_terms(images, student)
            total = self.generator_objective(terms)
            self.generator_optimizer.zero_grad(set_to_none=True)
            total.backward()
            self.generator_optimizer.step()
        finally:
            student.requires_grad_(True)
            self.discriminator.requires_grad_(True)
        return {"total": total.detach(), **{name: value.detach() for name, value in terms.items()}}

    # -- the interface ---------------------------------------------------------------------
    def plan(self, total_student_steps: int) -> None:
        """The generator's and discriminator's cosine schedules span the run's rounds."""
        self.total_rounds = math.ceil(total_student_steps / self.student_steps_per_round)

    def _anneal(self) -> None:
        factor = cosine_factor(self.rounds, self.total_rounds) if self.total_rounds else 1.0
        for optimizer, key in ((self.generator_optimizer, "generator_lr"), (self.discriminator_optimizer, "discriminator_lr")):
            for group in optimizer.param_groups:
                group["lr"] = self.options[key] * factor

    def synthesize(self, student):
        self._anneal()
        self.generator.train()
        self.discriminator.train()
        images = self.generate(self.batch_size)
        out = {}
        if self.options["local_weight"]:
            out["disc_loss"] = self.discriminator_step(images, self.wild_batch(self.discriminator_order))
        out.update({f"gen_{name}": value for name, value in self.generator_step(images, student).items()})
        self.rounds += 1
        self.images_synthesized += self.batch_size
        return out

    def sample(self):
        with torch.no_grad():
            images = self.generate(self.batch_size)
        self.images_synthesized += self.batch_size
        if self.options["wild_in_student_batch"]:
            wild = self.wild_batch(self.student_order)
            if self.options["augment"]:
                wild = augment_batch(wild, pad=self.options["pad"], flip=self.options["flip"])
            images = torch.cat([images, wild])
        return SyntheticBatch(images)

    def preview(self, n):
        with torch.no_grad():
            return torch.cat([self.generate(min(self.batch_size, n - done)) for done in range(0, n, self.batch_size)])

    def state_dict(self):
        state = super().state_dict()
        state.update(generator=self.generator.state_dict(), discriminator=self.discriminator.state_dict(),
                     generator_optimizer=self.generator_optimizer.state_dict(),
                     discriminator_optimizer=self.discriminator_optimizer.state_dict(), rounds=self.rounds,
                     discriminator_order=self.discriminator_order.state_dict(),
                     student_order=self.student_order.state_dict())
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.generator_optimizer.load_state_dict(state["generator_optimizer"])
        self.discriminator_optimizer.load_state_dict(state["discriminator_optimizer"])
        self.rounds = int(state["rounds"])
        self.discriminator_order.load_state_dict(state["discriminator_order"])
        self.student_order.load_state_dict(state["student_order"])

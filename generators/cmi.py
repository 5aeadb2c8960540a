"""Contrastive Model Inversion (CMI; Fang et al., IJCAI 2021, arXiv:2105.08584)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.core.losses import agreement_masked_kl
from dfkd.core.taps import FeatureTap, block_paths, inner_network
from generators.base import (
    Synthesizer,
    SynthesizerOptionError,
    SyntheticBatch,
    augment_batch,
    bn_statistics_hook,
    register_synthesizer,
    seeded,
)
from generators.networks import DCGANGenerator
from generators.pool import ImagePool


class ProjectionHead(nn.Module):
    """CMI's MLP head: ``Linear(D, D) -> ReLU -> Linear(D, head_dim)``, output l2-normalised."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim_in, dim_in), nn.ReLU(), nn.Linear(dim_in, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=1, p=2)


class FeatureBank:
    """A bounded FIFO memory bank of feature vectors (CMI's ``MemoryBank``): once
    ``capacity`` rows are held, each new batch overwrites the oldest. :meth:`sample` draws
    up to ``k`` held rows without replacement."""

    def __init__(self, capacity: int, dim: int, device="cpu"):
        if capacity <= 0:
            raise ValueError("bank capacity must be positive")
        self.capacity, self.dim = int(capacity), int(dim)
        self.data = torch.zeros(self.capacity, self.dim, device=device)
        self.cursor = 0
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def add(self, features: torch.Tensor) -> None:
        features = features.detach().to(self.data.device, self.data.dtype)[-self.capacity :]
        n = features.shape[0]
        idx = (torch.arange(n, device=self.data.device) + self.cursor) % self.capacity
        self.data[idx] = features
        self.cursor = (self.cursor + n) % self.capacity
        self.count = min(self.capacity, self.count + n)

    def sample(self, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.count == 0:
            return self.data[:0]
        idx = torch.randperm(self.count, generator=generator)[: min(k, self.count)].to(self.data.device)
        return self.data[idx]

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "cursor": self.cursor, "count": self.count,
                "data": self.data[: self.count].cpu().clone() if self.count < self.capacity else self.data.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"bank capacity {state['capacity']} in the state, {self.capacity} here")
        self.cursor, self.count = int(state["cursor"]), int(state["count"])
        self.data.zero_()
        held = state["data"].to(self.data.device, self.data.dtype)
        self.data[: held.shape[0]] = held


def contrastive_loss(proj_local: torch.Tensor, proj_global: torch.Tensor, n_current: int, temperature: float) -> torch.Tensor:
    """CMI's instance-discrimination term (paper Eq. 8, official ``loss_cr``).

    Rows ``i`` of ``proj_local`` and ``proj_global`` are two views (local crop, global crop)
    of instance ``i``, projected and l2-normalised; the first ``n_current`` rows are the
    batch being synthesized, the rest come from the memory bank. With
    ``l_ij = local_i . global_j / temperature``, each instance must pick its own global view
    among all (the other instances' views are the negatives)::

        ce_i = -log softmax_j(l_ij)[i]
        L_cr = mean_{i < n} ce_i + mean_{i >= n} ce_i      (the second mean only if the bank is not empty)

    The global side is detached, as in the official code; splitting the mean keeps the
    current batch's gradient from shrinking as the bank grows."""
    logits = proj_local @ proj_global.detach().T / temperature
    ce = F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device), reduction="none")
    if ce.shape[0] > n_current:
        return ce[:n_current].mean() + ce[n_current:].mean()
    return ce.mean()


def random_resized_crop(images: torch.Tensor, scale: tuple[float, float] = (0.25, 1.0), ratio=(3 / 4, 4 / 3),
                        flip: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """CMI's local view (``RandomResizedCrop(scale=[0.25, 1])`` + horizontal flip), per sample
    and batched: a crop of a random area fraction in ``scale`` and aspect ratio in ``ratio``
    (log-uniform), at a random place inside the image, resized back to the full size
    (bilinear)."""
    n = images.shape[0]
    area = torch.empty(n).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    r = torch.exp(log_ratio)
    w = torch.sqrt(area * r).clamp(max=1.0)  # fractions of the side
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=generator) * 2 - 1) * (1 - h)
    sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def reset_generator(generator: nn.Module) -> None:
    """The official ``reset_model``: conv/linear weights ``N(0, 0.02)`` and zero biases,
    BatchNorm weights ``N(1, 0.02)`` and zero biases."""
    for m in generator.modules():
        if isinstance(m, (nn.ConvTranspose2d, nn.Linear, nn.Conv2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def feature_paths(teacher: nn.Module) -> list[str]:
    """The layers whose inputs give CMI its instance features: every ``BatchNorm2d`` of the
    teacher (the official default); a teacher without them: its ``block_paths``."""
    paths = [p for p, m in inner_network(teacher).named_modules() if isinstance(m, nn.BatchNorm2d)]
    return paths or list(block_paths(teacher))


@register_synthesizer("cmi")
class CMI(Synthesizer):
    """Contrastive Model Inversion: DeepInversion-style synthesis through a generator, with
    an instance-discrimination term that makes each new image distinguishable from the
    others, in the batch and in a memory bank of earlier ones, so that synthesis does not
    collapse onto a few modes.

    One synthesis round (paper Alg. 1, official ``CMISynthesizer.synthesize``):

    1. the generator (the CMI/Fast DCGAN with a sigmoid output, ``nz``, ``ngf``) is
       re-initialised (:func:`reset_generator`; every ``reset_every`` rounds, 1 = the
       paper's fresh generator each round) and a fresh ``z ~ N(0, I)`` and sorted random
       targets ``y`` are drawn;
    2. for ``iterations`` steps, minimise over the generator and ``z`` (Adam, ``lr``, betas
       (0.5, 0.999))::

           L = w_bn * sum_l ||mu_l - mu_l^BN||_2 + ||s2_l - s2_l^BN||_2     (BN statistics, global view)
             + w_oh * CE(f_T(g), y)                                       (one-hot)
             - w_adv * mean_i 1[argmax S = argmax T] KL(p_T || p_S)(g)    (adversarial)
             + w_cr * L_cr                                                (contrastive, :func:`contrastive_loss`)

       with ``g`` the global view (random crop, zero padding ``crop_pad``, flip) and ``l``
       the local view (:func:`random_resized_crop`, area ``[local_scale_min, 1]``, flip) of
       the images ``x = G(z)``. The instance feature of a view is the concatenation of the
       spatial means of the inputs of the teacher's ``BatchNorm2d`` layers
       (:func:`feature_paths`); a projection head (:class:`ProjectionHead`, ``head_dim``,
       its own Adam at ``lr``, never reset) maps the current batch's and ``n_negatives``
       bank entries' (local, global) features to the unit sphere, at temperature
       ``cr_temperature``;
    3. the images and features of the lowest-loss step go to the image pool and the feature
       bank (``bank_size``, FIFO).

    The student then takes ``student_steps_per_round`` KD steps (``T^2 KL`` at
    ``temperature``) on random pool images (random crop + flip when ``student_augment``),
    relabelled by the teacher.

    Defaults are the official scratch CIFAR-10 script (``scratch_cmi_cifar10_wrn402_wrn161.sh``:
    ``--g_steps 200 --lr_g 1e-3 --adv 0.5 --bn 1 --oh 1 --cr 0.8 --cr_T 0.1 --T 20``,
    synthesis batch 256, student batch 128, ``--kd_steps 400``, SGD lr 0.1, wd 1e-4, cosine;
    ``bank_size=40960, n_neg=4096, head_dim=256``, ``nz=256, ngf=64``). The official pool
    keeps every image (200 rounds x 256); ``pool_size`` 60,000 holds them all. The paper's
    optional pre-inverted initial data set (``--cmi_init``) is not used.
    """

    uses_bn_statistics = True
    defaults = {
        "nz": 256,
        "ngf": 64,
        "synthesis_batch_size": 256,
        "iterations": 200,
        "lr": 1e-3,
        "bn_weight": 1.0,
        "oh_weight": 1.0,
        "adv_weight": 0.5,
        "cr_weight": 0.8,
        "cr_temperature": 0.1,
        "bank_size": 40960,
        "n_negatives": 4096,
        "head_dim": 256,
        "reset_every": 1,
        "crop_pad": 4,
        "local_scale_min": 0.25,
        "flip": True,
        "pool_size": 60000,
        "student_augment": True,
        "batch_size": 128,
        "temperature": 20.0,
        "student_steps_per_round": 400,
    }
    student_recipe = {
        "optimizer": "sgd",
        "lr": 0.1,
        "weight_decay": 1e-4,
        "schedule": "cosine",
    }

    def __init__(self, teacher, image_shape, num_classes, device="cpu", seed=0, **options):
        super().__init__(teacher, image_shape, num_classes, device, seed, **options)
        o = self.options
        for key in ("iterations", "bank_size", "head_dim", "pool_size", "synthesis_batch_size"):
            if o[key] < 1:
                raise SynthesizerOptionError(f"cmi: {key} must be at least 1, got {o[key]}")
        if o["reset_every"] < 0 or o["n_negatives"] < 0:
            raise SynthesizerOptionError("cmi: reset_every and n_negatives must be 0 or more")
        if not 0 < o["local_scale_min"] <= 1 or o["cr_temperature"] <= 0:
            raise SynthesizerOptionError("cmi: local_scale_min must be in (0, 1] and cr_temperature above 0")
        self.bn_hook = bn_statistics_hook(teacher, "cmi", o["bn_weight"], global_moments=o["bn_global_moments"])
        self.bn_priors = self.build_bn_priors()
        paths = feature_paths(teacher)
        if not paths:
            raise SynthesizerOptionError("cmi: the teacher has neither BatchNorm2d layers nor block_paths to take "
                                         "instance features from")
        self.features = FeatureTap(teacher, paths, capture="input")
        self.feature_dim = self._probe_feature_dim()
        with seeded(seed):
            self.generator = DCGANGenerator(o["nz"], self.image_shape, o["ngf"], output="sigmoid").to(self.device)
            self.head = ProjectionHead(self.feature_dim, o["head_dim"]).to(self.device)
        self.head_optimizer = torch.optim.Adam(self.head.parameters(), lr=o["lr"])
        self.bank = FeatureBank(o["bank_size"], 2 * self.feature_dim, self.device)
        self.pool = ImagePool(o["pool_size"])
        self.rounds = 0
        self.last_round_losses: torch.Tensor | None = None

    def _probe_feature_dim(self) -> int:
        with torch.no_grad():
            self.teacher(torch.zeros(1, *self.image_shape, device=self.device))
        return int(self.instance_features().shape[1])

    def instance_features(self) -> torch.Tensor:
        """The last forward pass's instance features: spatial means of the tapped inputs, concatenated."""
        feats = [self.features[p] for p in self.features.paths]
        return torch.cat([f.float().mean(dim=(2, 3)) if f.dim() == 4 else f.float().flatten(1) for f in feats], dim=1)

    # -- synthesis -------------------------------------------------------------------------
    def objective(self, images, targets, student) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Named, unweighted terms for generated ``images``, and the batch's (local, global)
        instance features (for the bank)."""
        o = self.options
        global_view = augment_batch(images, pad=o["crop_pad"], flip=o["flip"])
        local_view = random_resized_crop(images, (o["local_scale_min"], 1.0), flip=o["flip"], generator=self.rng)
        with self.bn_hook.capture(), self.autocast():
            t_global = self.teacher(global_view).float()
        terms = {"bn": self.bn_hook.loss(t_global.device) if len(self.bn_hook) else t_global.new_zeros(()),
                 "oh": F.cross_entropy(t_global, targets)}
        global_feature = self.instance_features()
        if len(self.bn_priors):
            with self.autocast():
                terms["bn_prior"] = self.bn_priors.loss(global_view)
        if o["adv_weight"] > 0 and student is not None:
            with self.autocast():
                s_global = student(global_view).float()
            terms["adv"] = -agreement_masked_kl(s_global, t_global)
        with self.autocast():
            self.teacher(local_view)
        local_feature = self.instance_features()
        cached = self.bank.sample(o["n_negatives"], self.rng)
        cached_local, cached_global = cached[:, : self.feature_dim], cached[:, self.feature_dim :]
        n = images.shape[0]
        projected = self.head(torch.cat([local_feature, cached_local, global_feature, cached_global]))
        proj_local, proj_global = projected[: n + cached.shape[0]], projected[n + cached.shape[0] :]
        terms["cr"] = contrastive_loss(proj_local, proj_global, n, o["cr_temperature"])
        return terms, torch.cat([local_feature, global_feature], dim=1).detach()

    def weighted_total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        o = self.options
        weights = {"bn": o["bn_weight"], "bn_prior": o["bn_weight"], "oh": o["oh_weight"], "adv": o["adv_weight"],
                   "cr": o["cr_weight"]}
        return sum(weights[name] * value for name, value in terms.items())

    def synthesis_round(self, student) -> dict[str, torch.Tensor]:
        o = self.options
        n = o["synthesis_batch_size"]
        if o["reset_every"] and self.rounds % o["reset_every"] == 0:
            with seeded(int(torch.randint(0, 2**31 - 1, (1,), generator=self.rng))):
                reset_generator(self.generator)
        targets = torch.randint(0, self.num_classes, (n,), generator=self.rng).sort().values.to(self.device)
        z = torch.randn(n, o["nz"], generator=self.rng).to(self.device).requires_grad_(True)
        self.generator.train()
        optimizer = torch.optim.Adam([{"params": self.generator.parameters()}, {"params": [z]}], lr=o["lr"],
                                     betas=(0.5, 0.999))
        best_loss = best_images = best_features = None
        losses = []
        for _ in range(o["iterations"]):
            images = self.generator(z)
            terms, features = self.objective(images, targets, student)
            total = self.weighted_total(terms)
            losses.append(total.detach())
            if best_loss is None:
                best_loss, best_images, best_features = total.detach(), images.detach(), features
            else:  # keep the lowest-loss step without a host sync
                better = total.detach() < best_loss
                best_images = torch.where(better, images.detach(), best_images)
                best_features = torch.where(better, features, best_features)
                best_loss = torch.minimum(best_loss, total.detach())
            optimizer.zero_grad(set_to_none=True)
            self.head_optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            self.head_optimizer.step()
        self.last_round_losses = torch.stack(losses)
        self.pool.add(best_images.clamp(0, 1))
        self.bank.add(best_features)
        self.images_synthesized += n
        self.rounds += 1
        return {f"inv_{k}": v.detach() for k, v in terms.items()}

    def synthesize(self, student):
        was_training = student.training if student is not None else False
        if student is not None:
            student.eval()
            student.requires_grad_(False)
        try:
            return self.synthesis_round(student)
        finally:
            if student is not None:
                student.requires_grad_(True)
                student.train(was_training)

    # -- student side ----------------------------------------------------------------------
    def sample(self):
        images = self.pool.sample(self.batch_size, self.rng)
        if self.options["student_augment"]:
            images = augment_batch(images, pad=self.options["crop_pad"], flip=self.options["flip"])
        return SyntheticBatch(images)

    def preview(self, n):
        if len(self.pool) == 0:
            with torch.no_grad():
                z = torch.randn(n, self.options["nz"], generator=self.rng).to(self.device)
                return self.generator.eval()(z).clamp(0, 1)
        return self.pool.sample(n, self.rng)

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self):
        state = super().state_dict()
        state.update(generator=self.generator.state_dict(), head=self.head.state_dict(),
                     head_optimizer=self.head_optimizer.state_dict(), bank=self.bank.state_dict(),
                     pool=self.pool.state_dict(), rounds=self.rounds)
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.generator.load_state_dict(state["generator"])
        self.head.load_state_dict(state["head"])
        self.head_optimizer.load_state_dict(state["head_optimizer"])
        self.bank.load_state_dict(state["bank"])
        self.pool.load_state_dict(state["pool"], self.device)
        self.rounds = int(state["rounds"])

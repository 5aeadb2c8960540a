"""KegNet: Knowledge Extraction with No Observable Data (Yoo et al., NeurIPS 2019)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from generators.base import (
    Synthesizer,
    SynthesizerOptionError,
    SyntheticBatch,
    register_synthesizer,
    seeded,
    teacher_stats,
)
from generators.pool import ImagePool


class KegNetGenerator(nn.Module):
    """KegNet's image generator (official ``ImageGenerator``): ``[z, one-hot y]`` ->
    ``Linear(nz + K, 256) -> BN -> ReLU -> Linear(256, 128) -> BN -> ReLU`` -> four
    transposed 4x4 convolutions (128 -> 64 -> 16 -> 4 -> C channels, 1 -> 4 -> 8 -> 16 -> 32 px;
    BN + ReLU between them) -> ``tanh``, then each image standardised per channel (zero mean,
    unit deviation: the official ``normalize_images``, whose output is the teacher's normalised
    input). Here that standardised image is mapped to pixels with the teacher's own mean/std,
    ``clamp(mean + std * h, 0, 1)`` with a straight-through clamp, and resized when the data
    are not 32 px."""

    def __init__(self, num_classes: int, image_shape, nz: int = 10, mean=None, std=None):
        super().__init__()
        channels, height, width = image_shape
        self.num_classes, self.nz, self.size = num_classes, nz, (height, width)
        self.fc = nn.Sequential(nn.Linear(nz + num_classes, 256), nn.BatchNorm1d(256), nn.ReLU(),
                                nn.Linear(256, 128), nn.BatchNorm1d(128), nn.ReLU())
        self.conv = nn.Sequential(
            nn.ConvTranspose2d(128, 64, 4, 2, 0, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.ConvTranspose2d(64, 16, 4, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.ConvTranspose2d(16, 4, 4, 2, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
            nn.ConvTranspose2d(4, channels, 4, 2, 1, bias=False), nn.Tanh())
        mean = torch.as_tensor(mean if mean is not None else [0.5] * channels, dtype=torch.float32)
        std = torch.as_tensor(std if std is not None else [0.5] * channels, dtype=torch.float32)
        self.register_buffer("mean", mean.reshape(1, -1, 1, 1))
        self.register_buffer("std", std.reshape(1, -1, 1, 1))

    def forward(self, labels_onehot: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([z, labels_onehot], dim=1))
        h = self.conv(h.view(h.shape[0], -1, 1, 1))
        if tuple(h.shape[-2:]) != self.size:
            h = F.interpolate(h, size=self.size, mode="bilinear", align_corners=False)
        flat = h.flatten(2)
        h = (h - flat.mean(2)[..., None, None]) / flat.std(2)[..., None, None].clamp_min(1e-8)
        x = self.mean + self.std * h
        return x + (x.clamp(0.0, 1.0) - x).detach()


class KegNetDecoder(nn.Module):
    """KegNet's decoder (official ``Decoder``): the flattened image through
    ``Linear(nx, 120) -> ELU -> BN`` and ``layers`` more such blocks, then ``Linear(120, nz)``:
    it must recover the latent ``z`` an image was generated from."""

    def __init__(self, in_features: int, nz: int, layers: int, units: int = 120):
        super().__init__()
        blocks = [nn.Linear(in_features, units), nn.ELU(), nn.BatchNorm1d(units)]
        for _ in range(layers):
            blocks += [nn.Linear(units, units), nn.ELU(), nn.BatchNorm1d(units)]
        self.net = nn.Sequential(*blocks, nn.Linear(units, nz))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.flatten(1))


def pairwise_mean_distance(rows: torch.Tensor, metric: str) -> torch.Tensor:
    """``d_ij`` = the mean over features of ``|a_i - a_j|`` (``"l1"``) or ``(a_i - a_j)^2``
    (``"l2"``) for every pair of rows (official ``DiversityLoss.pairwise_distance``). The l1
    distances come from ``torch.cdist`` (the same values and gradients as the official
    broadcast difference, without its ``n x n x features`` tensor: 14x faster for 256 images)."""
    if metric == "l1":
        return torch.cdist(rows, rows, p=1) / rows.shape[1]
    return (rows.unsqueeze(0) - rows.unsqueeze(1)).pow(2).mean(2)


def diversity_loss(z: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """KegNet's diversity term (paper Eq. 6, official ``DiversityLoss(metric='l1')``):
    ``exp(-mean_ij d_z(i, j) * d_x(i, j))`` with ``d_z`` the pairwise mean squared difference
    of the latents and ``d_x`` the pairwise mean absolute difference of the images. Images
    drawn from distant latents must be far apart; it is smallest when they are."""
    return torch.exp(-(pairwise_mean_distance(z, "l2") * pairwise_mean_distance(images.flatten(1), "l1")).mean())


@register_synthesizer("kegnet")
class KegNet(Synthesizer):
    """KegNet: conditional generators trained so that the teacher classifies their images as
    the sampled label, a decoder can recover the latent from the image, and different latents
    give different images; the student learns from a fixed transfer set the generators make.

    Generator training (paper Eq. 3-7, official ``generator/train.py``), for each of
    ``num_generators`` generators (:class:`KegNetGenerator`) with its decoder
    (:class:`KegNetDecoder`, ``decoder_layers``), ``generator_steps`` Adam steps (``lr``, on
    both) over batches of ``generator_batch_size`` one-hot labels ``y`` (uniform classes) and
    latents ``z ~ N(0, I_nz)``::

        L = KL(y || softmax(f_T(G(y, z))))          (= CE(f_T(G(y, z)), y) for one-hot y)
          + alpha * mean (D(G(y, z)) - z)^2          (decoder: the latent is recoverable)
          + beta  * diversity_loss(z, G(y, z))       (:func:`diversity_loss`)

    Transfer set (official ``sample_kegnet_data``): ``images_per_generator`` images from each
    trained generator (random one-hot labels and latents), labelled with the teacher's softmax.
    All of it is made in the first synthesis round; later rounds synthesize nothing. The
    student then learns with ``KL(p_T || p_S)`` at ``temperature`` 1 (official ``KLDivLoss``
    on the stored soft labels) on random batches of the transfer set, Adam lr 1e-4.

    Defaults: the official Fashion-MNIST settings (``decoder_layers=3, lr=1e-2, alpha=1,
    beta=10``; MNIST: 1, 1e-3, 1, 0), 5 generators of 200 epochs x 100 batches of 256,
    6,400 images each (the official student's 100 batches of 64), student batch 64, 400
    epochs of 100 batches. The paper's students are Tucker-compressed copies of the teacher;
    here any student architecture.
    """

    defaults = {
        "num_generators": 5,
        "nz": 10,
        "generator_steps": 20000,
        "generator_batch_size": 256,
        "lr": 1e-2,
        "alpha": 1.0,
        "beta": 10.0,
        "decoder_layers": 3,
        "images_per_generator": 6400,
        "batch_size": 64,
        "temperature": 1.0,
        "student_steps_per_round": 1,
    }
    student_recipe = {
        "optimizer": "adam",
        "lr": 1e-4,
        "schedule": "constant",
    }

    def __init__(self, teacher, image_shape, num_classes, device="cpu", seed=0, **options):
        super().__init__(teacher, image_shape, num_classes, device, seed, **options)
        o = self.options
        for key in ("num_generators", "nz", "generator_steps", "generator_batch_size", "images_per_generator"):
            if o[key] < 1:
                raise SynthesizerOptionError(f"kegnet: {key} must be at least 1, got {o[key]}")
        if o["generator_batch_size"] < 2:
            raise SynthesizerOptionError("kegnet: generator_batch_size must be at least 2 (BatchNorm, diversity)")
        if o["decoder_layers"] < 0:
            raise SynthesizerOptionError("kegnet: decoder_layers must be 0 or more")
        self.mean, self.std = teacher_stats(teacher, self.image_shape[0])
        self.seed = int(seed)
        self.pool = ImagePool(o["num_generators"] * o["images_per_generator"])
        self.soft_labels: torch.Tensor | None = None
        self.generators_done = 0
        self.last_terms: dict[str, torch.Tensor] = {}

    def build(self, index: int) -> tuple[KegNetGenerator, KegNetDecoder]:
        """Generator and decoder number ``index``, seeded from the run's seed (the official
        code seeds generator ``i`` with ``2019 + i``)."""
        o = self.options
        with seeded(self.seed * 1000 + index):
            generator = KegNetGenerator(self.num_classes, self.image_shape, o["nz"], self.mean, self.std)
            decoder = KegNetDecoder(int(torch.tensor(self.image_shape).prod()), o["nz"], o["decoder_layers"])
        return generator.to(self.device), decoder.to(self.device)

    def sample_inputs(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, self.num_classes, (n,), generator=self.rng)
        onehot = F.one_hot(labels, self.num_classes).float().to(self.device)
        return onehot, torch.randn(n, self.options["nz"], generator=self.rng).to(self.device)

    def objective(self, generator, decoder, onehot, z) -> dict[str, torch.Tensor]:
        """Named, unweighted terms of the generator/decoder loss for one batch."""
        images = generator(onehot, z)
        with self.autocast():
            logits = self.teacher(images).float()
        return {"cls": F.kl_div(F.log_softmax(logits, dim=1), onehot, reduction="batchmean"),
                "dec": F.mse_loss(decoder(images), z),
                "div": diversity_loss(z, images)}

    def weighted_total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        o = self.options
        return terms["cls"] + o["alpha"] * terms["dec"] + o["beta"] * terms["div"]

    def train_generator(self, index: int) -> tuple[KegNetGenerator, dict[str, torch.Tensor]]:
        o = self.options
        generator, decoder = self.build(index)
        generator.train()
        decoder.train()
        optimizer = torch.optim.Adam(list(generator.parameters()) + list(decoder.parameters()), lr=o["lr"])
        for _ in range(o["generator_steps"]):
            terms = self.objective(generator, decoder, *self.sample_inputs(o["generator_batch_size"]))
            optimizer.zero_grad(set_to_none=True)
            self.weighted_total(terms).backward()
            optimizer.step()
        return generator, {k: v.detach() for k, v in terms.items()}

    def synthesize(self, student):
        o = self.options
        while self.generators_done < o["num_generators"]:
            generator, terms = self.train_generator(self.generators_done)
            generator.eval()
            with torch.no_grad():
                for start in range(0, o["images_per_generator"], 256):
                    images = generator(*self.sample_inputs(min(256, o["images_per_generator"] - start)))
                    images = images.clamp(0, 1)
                    soft = torch.softmax(self.teacher_logits(images), dim=1)
                    self.pool.add(images)
                    self.soft_labels = soft if self.soft_labels is None else torch.cat([self.soft_labels, soft])
                    self.images_synthesized += images.shape[0]
            self.generators_done += 1
            self.last_terms = {f"gen_{k}": v for k, v in terms.items()}
        return dict(self.last_terms)

    # -- student side -----------------------------------------------------------------------
    def sample(self):
        idx = torch.randint(0, len(self.pool), (self.batch_size,), generator=self.rng).to(self.device)
        return SyntheticBatch(self.pool.images[idx], torch.log(self.soft_labels[idx].clamp_min(1e-12)))

    def preview(self, n):
        if len(self.pool) == 0:
            generator, _ = self.build(0)
            with torch.no_grad():
                return generator.eval()(*self.sample_inputs(n)).clamp(0, 1)
        return self.pool.sample(n, self.rng)

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self):
        state = super().state_dict()
        state.update(pool=self.pool.state_dict(), generators_done=self.generators_done,
                     soft_labels=None if self.soft_labels is None else self.soft_labels.cpu(),
                     last_terms={k: v.cpu() for k, v in self.last_terms.items()})
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.pool.load_state_dict(state["pool"], self.device)
        self.generators_done = int(state["generators_done"])
        labels = state.get("soft_labels")
        self.soft_labels = None if labels is None else labels.to(self.device)
        self.last_terms = {k: v.to(self.device) for k, v in state.get("last_terms", {}).items()}

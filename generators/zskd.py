"""Zero-Shot Knowledge Distillation (ZSKD; Nayak et al., ICML 2019, arXiv:1905.08114).

Data Impressions (DIs): images optimised from random noise until the teacher's softmax at a
high temperature matches soft targets sampled from a Dirichlet distribution whose
concentration comes from the teacher's own final-layer weights. The student then learns by
KD from the DIs (augmented) at the same temperature.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.core.taps import head_path, resolve_module
from generators.base import (
    PlannedBank,
    SynthesizerOptionError,
    SyntheticBatch,
    augment_batch,
    register_synthesizer,
)
from generators.pool import ImagePool

#: added to every concentration (each similarity row's minimum is 0 after min-max
#: normalisation, and a Dirichlet needs positive concentrations): the official
#: ``generateDirch`` draws from ``Dir(beta * C_c + 1e-4)``
CONCENTRATION_FLOOR = 1e-4


def class_similarity(weight: torch.Tensor) -> torch.Tensor:
    """ZSKD's class-similarity matrix (paper Sec. 3.2.1) from a final layer's weights
    ``W`` (``num_classes x features``, one weight vector per class, as ``nn.Linear`` holds
    them): ``C_ij = w_i . w_j / (||w_i|| ||w_j||)``, then each row min-max normalised to
    ``[0, 1]`` (``C_i <- (C_i - min C_i) / (max C_i - min C_i)``). The bias is not used.
    Row ``c`` says how similar each class is to class ``c``; its own entry is 1."""
    w = F.normalize(weight.detach().double(), dim=1)
    sim = w @ w.T
    low = sim.min(dim=1, keepdim=True).values
    high = sim.max(dim=1, keepdim=True).values
    return ((sim - low) / (high - low).clamp_min(1e-12)).float()


def dirichlet_concentration(similarity: torch.Tensor, target: int, beta: float) -> torch.Tensor:
    """The concentration of the Dirichlet the soft targets of class ``target`` are drawn
    from: ``beta * C_target + eps`` (paper Eq. 2-3; ``eps`` = :data:`CONCENTRATION_FLOOR`
    after the scaling, as the official code adds it), so every entry is at least ``eps``
    at any ``beta``."""
    return beta * similarity[target] + CONCENTRATION_FLOOR


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """``mean_i -sum_k y_ik log softmax(z_i / T)_k``: the DI objective (paper Eq. 4), the
    cross-entropy between a sampled softmax vector and the teacher's at temperature ``T``."""
    return -(targets * F.log_softmax(logits.float() / temperature, dim=1)).sum(dim=1).mean()


def _paper_transforms() -> torch.Tensor:
    """The affine maps (output -> input coordinates, ``[-1, 1]`` grid units, ``N x 2 x 3``) of
    the official ZSKD augmentation for one-channel data (``create_more_samples_using_augmentation``
    without CIFAR's noise variants): the image itself, central zooms to 0.9 / 0.75 / 0.6 of
    the side, shifts by 20% left / right / up / down, rotations by -90..90 degrees in 10
    steps, left-right / up-down flips and the transpose, and the compositions zoom + shift
    (12), shift + rotation (40) and zoom + rotation (30): 103 variants of each image."""
    eye = torch.eye(2, dtype=torch.float64)
    zero = torch.zeros(2, dtype=torch.float64)
    scales = [0.90, 0.75, 0.60]
    shifts = [torch.tensor(v, dtype=torch.float64) for v in ((-0.4, 0.0), (0.4, 0.0), (0.0, -0.4), (0.0, 0.4))]
    angles = [math.radians(-90 + 20 * k) for k in range(10)]

    def inverse_rotation(a):  # output pixel p shows input pixel R(-a) p
        c, s = math.cos(a), math.sin(a)
        return torch.tensor([[c, s], [-s, c]], dtype=torch.float64)

    maps = [(eye, zero)]
    maps += [(s * eye, zero) for s in scales]                                         # zoom
    maps += [(eye, -t) for t in shifts]                                               # shift
    maps += [(inverse_rotation(a), zero) for a in angles]                             # rotation
    maps += [(torch.tensor(m, dtype=torch.float64), zero)
             for m in ([[-1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, -1.0]], [[0.0, 1.0], [1.0, 0.0]])]  # flips
    maps += [(s * eye, -s * t) for s in scales for t in shifts]                       # shift of a zoom
    maps += [(inverse_rotation(a), -t) for t in shifts for a in angles]               # rotation of a shift
    maps += [(s * inverse_rotation(a), zero) for s in scales for a in angles]         # rotation of a zoom
    return torch.stack([torch.cat([a, b.view(2, 1)], dim=1) for a, b in maps]).float()


PAPER_TRANSFORMS = _paper_transforms()


def paper_augment(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image through one of the official code's 103 variants (:func:`_paper_transforms`),
    drawn uniformly per image: the same image-variant pairs, in expectation, as the official
    code's expansion of every batch into all 103 variants, at 1/103 of its cost. Bilinear,
    zero outside the image (the official ``translate_images`` fills the uncovered strip of a
    shift with 1.0 instead; its rotations fill with 0 as here)."""
    n = images.shape[0]
    pick = torch.randint(0, PAPER_TRANSFORMS.shape[0], (n,), generator=generator)
    theta = PAPER_TRANSFORMS[pick].to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@register_synthesizer("zskd")
class ZSKD(PlannedBank):
    """Zero-Shot Knowledge Distillation: Data Impressions from the teacher's weights.

    Soft targets (paper Sec. 3.2): the class-similarity matrix ``C`` of the teacher's final
    layer (:func:`class_similarity`: cosine similarities of the per-class weight vectors,
    each row min-max normalised). The softmax vectors of class ``c`` are drawn from
    ``Dir(beta * C_c + 1e-4)`` (:func:`dirichlet_concentration`) for each scale ``beta`` in
    ``betas`` (paper: 1.0 and 0.1, half of the DIs each; the small scale gives peaked,
    one-class-like targets, the large one targets spread over similar classes).

    Data Impressions (paper Eq. 4, Alg. 1): a batch of ``synthesis_batch_size`` images of one
    class and scale starts as uniform noise in ``[0, 1]`` (official code) and is optimised
    with Adam (``lr``) for ``iterations`` steps on
    ``CE(y, softmax(f_T(x) / synthesis_temperature))`` (:func:`soft_cross_entropy`); after
    each step the batch is min-max rescaled to ``[0, 1]``, as the official code does
    (``noise_image_clip``). With ``continue_batches`` (the official code's behaviour) only
    the first batch of each (class, scale) pair starts from noise: every later batch of the
    pair starts from the previous one's final images and Adam state and is optimised
    towards newly drawn targets, so the ``k``-th batch of a pair has had ``k * iterations``
    steps and little of the starting noise is left in it (the official
    ``createClassImpressions`` re-initialises ``noise_image`` once per similarity row, not per
    batch). Without it each batch starts from fresh noise, and after 100 steps at lr 0.01
    the DIs still correlate ~0.46 with their starting noise on a LeNet-5 teacher (~0.05
    after four carried batches). The batches cycle through (class, scale) pairs, so the
    ``num_impressions`` DIs are balanced over classes and scales. All DIs are made in the first
    synthesis round, as the paper makes them before training the student; later rounds
    synthesize nothing.

    Student (paper Sec. 3.3, official ``train.py``): KD at ``temperature`` 20
    (``T^2 KL``, the official ``T^2 CE`` up to a constant) from the teacher's outputs on DI
    batches of ``batch_size``, Adam lr 1e-3, constant rate. ``augment`` selects the student's
    augmentation: ``"paper"`` (:func:`paper_augment`, the official variants, relabelled by
    the teacher as the official code does), ``"crop_flip"`` (random 2-px crop + flip,
    :func:`generators.base.augment_batch`) or ``"none"``.

    Defaults: the official CIFAR-10 script's settings (``cifar_10_impressions_alexnet_Dirch.py``:
    40,000 DIs in batches of 100, Adam lr 0.001, 1500 iterations, temperature 20, images and
    Adam state carried from batch to batch of a pair) with the paper's betas 1.0 and 0.1. The
    paper's counts are 24,000 DIs for MNIST and 48,000 for Fashion-MNIST (``configs/<dataset>/zskd.yaml``). At lr 0.01 the DI loss of a LeNet-5
    teacher stops falling after about 100 of the 1500 iterations (docs/experiments.md).

    Differences from the official code, on purpose: the official ``generateDirch`` min-max
    normalises each similarity row again after the 0.1 scaling and always passes scale 1, so
    all its DIs are drawn with beta 1; here both of the paper's scales are used (``betas:
    "1.0"`` gives the official code's targets). The official student script expands every
    student batch into all 103 augmented variants (about 6,600 images per step, 500 epochs)
    and reports the best test accuracy over epochs; here each student image gets one random
    variant and the run reports its final accuracy.
    """

    defaults = {
        "num_impressions": 40000,
        "synthesis_batch_size": 100,
        "iterations": 1500,
        "lr": 0.001,
        "synthesis_temperature": 20.0,
        "betas": "1.0,0.1",
        "continue_batches": True,
        "augment": "paper",
        "batch_size": 64,
        "temperature": 20.0,
        "student_steps_per_round": 1,
    }
    student_recipe = {
        "optimizer": "adam",
        "lr": 1e-3,
        "schedule": "constant",
    }
    AUGMENTS = ("paper", "crop_flip", "none")

    def __init__(self, teacher, image_shape, num_classes, device="cpu", seed=0, **options):
        super().__init__(teacher, image_shape, num_classes, device, seed, **options)
        o = self.options
        self.betas = self.parse_betas(o["betas"])
        for key in ("num_impressions", "synthesis_batch_size", "iterations"):
            if o[key] < 1:
                raise SynthesizerOptionError(f"zskd: {key} must be at least 1, got {o[key]}")
        if o["augment"] not in self.AUGMENTS:
            raise SynthesizerOptionError(f"zskd: augment must be one of {', '.join(self.AUGMENTS)}, not {o['augment']!r}")
        self.similarity = class_similarity(self.final_layer_weight(teacher)).to(self.device)
        self.pool = ImagePool(o["num_impressions"])
        self.batches_done = 0
        self.last_terms: dict[str, torch.Tensor] = {}
        #: per (class, beta): the final images and Adam state of its latest batch (continue_batches)
        self.carried: dict[tuple[int, float], dict] = {}

    @staticmethod
    def parse_betas(text: str) -> list[float]:
        try:
            betas = [float(v) for v in str(text).replace(" ", ",").split(",") if v]
        except ValueError:
            betas = []
        if not betas or any(not math.isfinite(b) or b <= 0 for b in betas):
            raise SynthesizerOptionError(f"zskd: betas must be positive numbers separated by commas (paper: '1.0,0.1'), "
                                         f"got {text!r}")
        return betas

    def final_layer_weight(self, teacher) -> torch.Tensor:
        """The weights of the teacher's classifier head (its ``head_path``, an ``nn.Linear``
        with one output per class)."""
        path = head_path(teacher)
        layer = resolve_module(teacher, path) if path is not None else None
        if not isinstance(layer, nn.Linear) or layer.out_features != self.num_classes:
            raise SynthesizerOptionError(
                "zskd: the class similarities come from the teacher's final layer, which must be an nn.Linear with one "
                f"output per class named by the model's head_path; got {path!r} ({type(layer).__name__}). "
                "A teacher ensemble has no single final layer: distill from one of its members.")
        return layer.weight

    # -- the plan of DIs --------------------------------------------------------------------
    @property
    def total_batches(self) -> int:
        o = self.options
        return math.ceil(o["num_impressions"] / o["synthesis_batch_size"])

    def batch_plan(self, index: int) -> tuple[int, float, int]:
        """Batch ``index``'s (class, beta, size): (class, scale) pairs in turn, the last
        batch cut to reach ``num_impressions`` exactly."""
        o = self.options
        pairs = [(c, b) for c in range(self.num_classes) for b in self.betas]
        cls, beta = pairs[index % len(pairs)]
        size = min(o["synthesis_batch_size"], o["num_impressions"] - index * o["synthesis_batch_size"])
        return cls, beta, size

    def sample_targets(self, cls: int, beta: float, n: int) -> torch.Tensor:
        """``n`` soft targets of class ``cls`` from ``Dir(beta * C_cls)`` (drawn with this
        synthesizer's generator, reproducible by seed)."""
        alpha = dirichlet_concentration(self.similarity.cpu().double(), cls, beta)
        # Dirichlet by normalised Gamma draws, so that the draw uses self.rng
        gammas = torch._standard_gamma(alpha.expand(n, -1).contiguous(), generator=self.rng)
        targets = gammas / gammas.sum(dim=1, keepdim=True)
        # a concentration far below 1 can underflow every Gamma draw of a row: fall back to the class itself
        bad = ~torch.isfinite(targets).all(dim=1)
        if bad.any():
            targets[bad] = F.one_hot(torch.full((int(bad.sum()),), cls), self.num_classes).double()
        return targets.float().to(self.device)

    # -- synthesis --------------------------------------------------------------------------
    def invert(self, targets: torch.Tensor, start: dict | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Optimise one batch of DIs towards the soft ``targets``: from uniform noise, or from
        ``start`` (``{"images", "adam"}``: a previous batch's final images and Adam state, at
        least as many images as targets). The final images and Adam state are left in
        ``self.last_state``."""
        o = self.options
        n = targets.shape[0]
        if start is None:
            x = torch.rand((n, *self.image_shape), generator=self.rng).to(self.device).requires_grad_(True)
        else:
            x = start["images"][:n].clone().to(self.device).requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=o["lr"])
        if start is not None:
            adam = start["adam"]
            adam = {"state": {k: {name: (v[:n] if torch.is_tensor(v) and v.dim() > 0 else v) for name, v in st.items()}
                              for k, st in adam["state"].items()},
                    "param_groups": adam["param_groups"]}
            optimizer.load_state_dict(adam)
        for _ in range(o["iterations"]):
            with self.autocast():
                logits = self.teacher(x).float()
            loss = soft_cross_entropy(logits, targets, o["synthesis_temperature"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():  # the official noise_image_clip: min-max rescale the batch to [0, 1]
                low, high = x.min(), x.max()
                x.sub_(low).div_((high - low).clamp_min(1e-12))
        images = x.detach()
        self.last_state = {"images": images, "adam": optimizer.state_dict()}
        logits = self.teacher_logits(images)
        terms = {"ce": soft_cross_entropy(logits, targets, o["synthesis_temperature"]),
                 "target_match": (logits.argmax(1) == targets.argmax(1)).float().mean()}
        return images, terms

    def synthesize(self, student):
        while self.batches_done < self.total_batches:
            cls, beta, size = self.batch_plan(self.batches_done)
            start = self.carried.get((cls, beta)) if self.options["continue_batches"] else None
            images, terms = self.invert(self.sample_targets(cls, beta, size), start)
            if self.options["continue_batches"]:
                self.carried[(cls, beta)] = self.last_state
            self.pool.add(images)
            self.images_synthesized += size
            self.batches_done += 1
            self.last_terms = {f"di_{k}": v.detach() for k, v in terms.items()}
        self.carried.clear()  # every DI exists: nothing left to continue
        return dict(self.last_terms)

    # -- student side -----------------------------------------------------------------------
    def augment(self, images: torch.Tensor) -> torch.Tensor:
        mode = self.options["augment"]
        if mode == "paper":
            return paper_augment(images, self.rng)
        if mode == "crop_flip":
            return augment_batch(images)
        return images

    def sample(self):
        return SyntheticBatch(self.augment(self.pool.sample(self.batch_size, self.rng)))

    def preview(self, n):
        if len(self.pool) == 0:  # what every DI starts from
            return torch.rand((n, *self.image_shape), generator=self.rng).to(self.device)
        return self.pool.sample(n, self.rng)


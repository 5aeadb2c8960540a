"""Data-free KD from activation records (Lopes, Fenu & Starner, "Data-Free Knowledge
Distillation for Deep Neural Networks", 2017, arXiv:1710.07535).

While the training data is at hand, the teacher's activations on it are summarised per class
("metadata", :func:`record_activations`) and stored in the teacher checkpoint's meta under
:data:`RECORDS_KEY`. Later, without the data, inputs are reconstructed from those records
alone: a target activation is sampled from a class's statistics and an input is optimised
from noise until the teacher's activations match it (:class:`Lopes`).
"""
from __future__ import annotations

import math

import torch

from dfkd.core.taps import FeatureTap, resolve_module
from generators.activation_records import (
    RECORDS_KEY,
    SAMPLINGS,
    TOP,
    check_records,
    matching_loss,
    sample_targets,
)
from generators.base import (
    PlannedBank,
    SynthesizerOptionError,
    SyntheticBatch,
    augment_batch,
    register_synthesizer,
)
from generators.pool import ImagePool


@register_synthesizer("lopes")
class Lopes(PlannedBank):
    """Data-free KD from activation records (Lopes et al. 2017): inputs reconstructed from
    per-class statistics of the teacher's activations.

    **This method needs metadata recorded while the training data was at hand**: the
    teacher checkpoint must hold activation records (``meta["activation_records"]``,
    :func:`record_activations`), written by ``dfkd train-teacher --record-metadata``. They
    reach the synthesizer as the constructor argument ``records`` (not an option: they are
    tensors); a teacher without them is refused.

    Reconstruction (paper Sec. 3, official ``procedures/optimize_dataset.py``): each batch of
    ``synthesis_batch_size`` images belongs to one class ``c`` (batches cycle through the
    classes). Targets ``h^l`` are drawn from class ``c``'s statistics (:func:`sample_targets`,
    ``sampling``), and the batch starts as noise ``x ~ N(init_mean, init_std^2)`` in pixel
    space and is optimised with Adam (``lr``) for ``iterations`` steps on
    (:func:`matching_loss`)::

        top_layer:   L(x) = mean_{i,k} (relu(h_ik) - relu(z_ik(x) / T_r))^2
        all_layers:  L(x) = sum_l 1/D_l mean_{i,u} (relu(h^l_iu) - relu(a^l_iu(x)))^2

    with ``z`` the teacher's logits, ``T_r`` the records' temperature (8) and ``a^l`` the
    recorded hidden pre-activations followed by ``z / T_r`` (``objective``). The official code
    does not constrain the pixels while optimising; the finished batch is clipped to
    ``[0,1]`` (every image between components is), or, with ``clip_each_step``, after every step.
    All ``num_images`` are made in the first synthesis round, as the official code makes the
    whole data set before distilling; later rounds synthesize nothing.

    Student (official ``procedures/distill.py``): KD at ``temperature`` 8 from the teacher's
    outputs on batches of ``batch_size`` drawn from the reconstructions (``T^2 KL``, the
    official cross-entropy at T=8 up to a constant and a scale), Adam lr 1e-3, constant rate,
    no augmentation (``student_augment`` adds a 2-px crop and flip).

    Defaults (official code): ``top_layer`` (the README's example), Adam lr 0.07 ("og lr
    was 0.07", README ``--lr=0.07``), 1000 steps per batch, batches of 64
    (``train_batch_size``), noise N(0.15, 0.1^2) (its MNIST line), 100 batches per class
    (64,000 images for 10 classes), ``official`` sampling.

    Not implemented: ``all_layers_dropout`` (needs a teacher trained with dropout and fixed
    dropout masks) and the spectral objectives (the official code's spectral losses and
    samples are the same as ``all_layers``; its graph statistics are never used).
    """

    defaults = {
        "objective": "top_layer",
        "num_images": 64000,
        "synthesis_batch_size": 64,
        "iterations": 1000,
        "lr": 0.07,
        "init_mean": 0.15,
        "init_std": 0.1,
        "sampling": "official",
        "clip_each_step": False,
        "student_augment": False,
        "batch_size": 64,
        "temperature": 8.0,
        "student_steps_per_round": 1,
    }
    student_recipe = {
        "optimizer": "adam",
        "lr": 1e-3,
        "schedule": "constant",
    }
    OBJECTIVES = ("top_layer", "all_layers")

    teacher_meta_arguments = {"records": RECORDS_KEY}

    def __init__(self, teacher, image_shape, num_classes, device="cpu", seed=0, records=None, **options):
        super().__init__(teacher, image_shape, num_classes, device, seed, **options)
        o = self.options
        self.records = check_records(records, self.num_classes)
        if o["objective"] not in self.OBJECTIVES:
            raise SynthesizerOptionError(f"lopes: objective must be one of {', '.join(self.OBJECTIVES)}, "
                                         f"not {o['objective']!r}")
        if o["sampling"] not in SAMPLINGS:
            raise SynthesizerOptionError(f"lopes: sampling must be one of {', '.join(SAMPLINGS)}, not {o['sampling']!r}")
        for key in ("num_images", "synthesis_batch_size", "iterations"):
            if o[key] < 1:
                raise SynthesizerOptionError(f"lopes: {key} must be at least 1, got {o[key]}")
        layers = self.records["layers"]
        if o["objective"] == "all_layers":
            if len(layers) < 2:
                raise SynthesizerOptionError("lopes: objective all_layers needs hidden-layer records, and these hold the "
                                             "top layer only; use objective top_layer or record all layers")
            self.layers = list(layers)
        else:
            self.layers = [layers[-1]]
        self.temperature_records = float(self.records["temperature"])
        hidden = [layer for layer in self.layers if layer["path"] != TOP]
        self.tap_paths = {capture: [layer["path"] for layer in hidden if layer["capture"] == capture]
                          for capture in ("input", "output")}
        try:
            for path in self.tap_paths["input"] + self.tap_paths["output"]:
                resolve_module(teacher, path)
        except ValueError as exc:
            raise SynthesizerOptionError(f"lopes: the activation records name layers this teacher lacks ({exc}); "
                                         "they belong to another model") from None
        counts = list(self.records["counts"])
        self.classes = [c for c, n in enumerate(counts) if n > 0]
        if not self.classes:
            raise SynthesizerOptionError("lopes: the activation records hold no class with images")
        self.pool = ImagePool(o["num_images"])
        self.batches_done = 0
        self.last_terms: dict[str, torch.Tensor] = {}

    # -- one batch --------------------------------------------------------------------------
    def activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The teacher's activations on ``x`` for the matched layers, bottom to top."""
        with FeatureTap(self.teacher, self.tap_paths["input"], "input") as tap_in, \
                FeatureTap(self.teacher, self.tap_paths["output"], "output") as tap_out, self.autocast():
            logits = self.teacher(x).float()
            taps = {"input": tap_in.features, "output": tap_out.features}
        acts = []
        for layer in self.layers:
            if layer["path"] == TOP:
                acts.append(logits / self.temperature_records)
            else:
                acts.append(taps[layer["capture"]][layer["path"]].flatten(1).float())
        return acts

    def loss(self, x: torch.Tensor, targets: list[torch.Tensor]) -> torch.Tensor:
        """The reconstruction loss of inputs ``x`` against sampled ``targets`` (one per matched layer)."""
        return matching_loss(self.activations(x), targets, normalise=self.options["objective"] == "all_layers")

    def sample_layer_targets(self, cls: int, n: int) -> list[torch.Tensor]:
        return [sample_targets(layer, cls, n, self.options["sampling"], self.rng).to(self.device) for layer in self.layers]

    def initial_images(self, n: int) -> torch.Tensor:
        o = self.options
        return (o["init_mean"] + o["init_std"] * torch.randn((n, *self.image_shape), generator=self.rng)).to(self.device)

    def reconstruct(self, cls: int, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Optimise ``n`` inputs of class ``cls`` from noise; returns them clipped to ``[0,1]``
        and the final terms (loss on the returned images, and how many the teacher puts in ``cls``)."""
        o = self.options
        targets = self.sample_layer_targets(cls, n)
        x = self.initial_images(n).requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=o["lr"])
        for _ in range(o["iterations"]):
            loss = self.loss(x, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if o["clip_each_step"]:
                with torch.no_grad():
                    x.clamp_(0, 1)
        images = x.detach().clamp(0, 1)
        with torch.no_grad():
            terms = {"rec": self.loss(images, targets).detach(),
                     "target_match": (self.teacher_logits(images).argmax(1) == cls).float().mean()}
        return images, terms

    # -- the interface ----------------------------------------------------------------------
    @property
    def total_batches(self) -> int:
        return math.ceil(self.options["num_images"] / self.options["synthesis_batch_size"])

    def synthesize(self, student):
        o = self.options
        while self.batches_done < self.total_batches:
            cls = self.classes[self.batches_done % len(self.classes)]
            size = min(o["synthesis_batch_size"], o["num_images"] - self.batches_done * o["synthesis_batch_size"])
            images, terms = self.reconstruct(cls, size)
            self.pool.add(images, torch.full((size,), cls, dtype=torch.long))
            self.images_synthesized += size
            self.batches_done += 1
            self.last_terms = {f"lopes_{k}": v for k, v in terms.items()}
        return dict(self.last_terms)

    def sample(self):
        images = self.pool.sample(self.batch_size, self.rng)
        if self.options["student_augment"]:
            images = augment_batch(images)
        return SyntheticBatch(images)

    def preview(self, n):
        if len(self.pool) == 0:  # what every reconstruction starts from
            return self.initial_images(n).clamp(0, 1)
        return self.pool.sample(n, self.rng)


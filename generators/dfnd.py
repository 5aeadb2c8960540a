"""DFND: Data-Free Noisy Distillation (Chen et al., "Learning Student Networks in the Wild", CVPR 2021).

No images are synthesized. A large set of unlabeled images "in the wild" (another data set, web
photos) is filtered once with the teacher, and the student learns from the kept images with KD
plus a noise-adapted cross-entropy on the teacher's labels.

**Selection** (official ``DFND-train.py``, ``identify_outlier`` and ``main``): every wild image
``x`` gets the teacher's cross-entropy against its own prediction,

    s(x) = CE(z_T(x), argmax z_T(x)) = logsumexp(z_T(x)) - max_k z_T(x)_k = -log max_k p_T(k|x),

and the ``k`` images with the *smallest* score are kept, over the whole set (no per-class quota;
the official code keeps 600,000 of ImageNet's 1,281,167 training images, 46.8%). Scores are
computed on the images without augmentation. ``class_balanced=True`` instead keeps the
``k // K`` lowest-score images of each class the teacher predicts (a variant, not the official
rule); a class with fewer predicted images keeps all of them.

**Student loss** (official ``train``), on augmented batches of the kept images, with the teacher's
logits ``z_T`` and the student's ``z_S`` on the same images and ``y = argmax z_T``:

    L = kd + noise_weight * noise
    kd    = T^2 * KL(softmax(z_T/T) || softmax(z_S/T))          (batch mean, T = 4)
    noise = -mean_i log [ softmax(z_S,i) Q ]_{y_i}

``Q`` is the K x K noise-adaptation matrix, ``Q_ij`` the probability that the teacher says ``j``
when the class is ``i``: its diagonal is fixed to the teacher's accuracy ``a`` and each row's
off-diagonal entries are ``(1 - a) * softmax(W_i)`` of a learned ``K x (K-1)`` matrix ``W``
(zeros at the start, so every wrong label is equally likely), so each row sums to 1. ``W``
is trained with its own Adam (lr 1e-3) on the same loss; here its step is taken at the start of
the next student step, on the gradient the engine's backward pass left.

Defaults from the official code: batch 256, T = 4, crop (4 px padding) + horizontal flip,
``noise_lr`` 1e-3, ``teacher_accuracy`` 0.95 (the code hard-codes its CIFAR-10 teacher's 0.9523,
CIFAR-100's 0.7774: give your teacher's test accuracy). Student: SGD lr 0.1, momentum 0.9,
weight decay 5e-4, divided by 10 at 40% and 80% of the run (the engine's ``step`` schedule
divides at 50% and 75%, and its SGD uses Nesterov momentum); ``512 * 40000 / k`` epochs of the
``k`` kept images, i.e. about 80,000 steps of 256 whatever ``k``.

Under ``torchrun`` every rank keeps the same images, and each epoch over them is split by
:class:`torch.utils.data.distributed.DistributedSampler` (:class:`dfkd.data.sampling.ShareBatches`),
so the ranks learn from disjoint shares; the position in the epoch is saved with the state.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dfkd.core.losses import kd_loss
from dfkd.data.sampling import ShareBatches, resolve_share
from dfkd.data.types import DatasetError, image_of
from generators.base import Synthesizer, SynthesizerOptionError, SyntheticBatch, augment_batch, register_synthesizer


def selection_scores(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DFND's score of each image, ``CE(z, argmax z) = logsumexp(z) - max z`` (low: the teacher
    is confident), and the teacher's predicted class."""
    logits = logits.float()
    top, pred = logits.max(dim=1)
    return torch.logsumexp(logits, dim=1) - top, pred


def select_indices(scores: torch.Tensor, pred: torch.Tensor, k: int, num_classes: int,
                   class_balanced: bool = False) -> torch.Tensor:
    """Indices (ascending) of the images DFND keeps: the ``k`` lowest ``scores`` overall, or, when
    ``class_balanced``, the ``k // num_classes`` lowest of each predicted class. No host sync."""
    k = min(int(k), scores.shape[0])
    if not class_balanced:
        return scores.topk(k, largest=False).indices.sort().values
    order = scores.argsort(stable=True)
    order = order[pred[order].argsort(stable=True)]  # by class, then by score within the class
    counts = torch.bincount(pred, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.shape[0], device=order.device) - starts[pred[order]]
    return order[rank < k // num_classes].sort().values


def noise_adaptation_matrix(weights: torch.Tensor, accuracy: float) -> torch.Tensor:
    """``Q`` (K x K) from the learned ``K x (K-1)`` ``weights``: ``Q_ii = accuracy`` and row
    ``i``'s off-diagonal entries, in column order, ``(1 - accuracy) * softmax(weights_i)``."""
    k = weights.shape[0]
    eye = torch.eye(k, dtype=torch.bool, device=weights.device)
    off = F.softmax(weights.float(), dim=1) * (1.0 - accuracy)
    q = torch.zeros(k, k, device=weights.device).masked_scatter(~eye, off)
    return q + accuracy * eye.float()


def noisy_nll(student_logits: torch.Tensor, labels: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``-mean_i log [softmax(z_S,i) Q]_{y_i}``: cross-entropy of the noise-adapted student
    prediction with the teacher's labels."""
    adapted = F.softmax(student_logits.float(), dim=1) @ q
    return F.nll_loss(torch.log(adapted), labels)


@register_synthesizer("dfnd")
class DFND(Synthesizer):
    """Unlabeled wild images kept by the teacher's confidence, KD plus noise adaptation; see the
    module docstring.

    ``images``: an ``N x C x H x W`` tensor in ``[0, 1]`` (moved to ``device``), or a map-style
    data set of ``C x H x W`` images (e.g. :class:`dfkd.data.folder.ImageFolderSet`, read a
    batch at a time). Options: ``num_select`` (images kept; 0: ``select_fraction`` of the set),
    ``class_balanced``, ``teacher_accuracy`` (the diagonal of ``Q``), ``noise_weight`` (0 drops
    the noise term: plain KD on the kept images), ``noise_lr``, ``augment``/``pad``/``flip``,
    ``selection_batch_size``. The selection runs once, at the first ``synthesize`` or ``sample``;
    :meth:`describe` and ``selected_per_class`` give how many were kept per predicted class.
    """

    takes_images = True
    defaults = {
        "batch_size": 256,
        "temperature": 4.0,
        "num_select": 0,
        "select_fraction": 0.468,
        "class_balanced": False,
        "teacher_accuracy": 0.95,
        "noise_weight": 1.0,
        "noise_lr": 1e-3,
        "augment": True,
        "pad": 4,
        "flip": True,
        "selection_batch_size": 256,
    }
    student_recipe = {
        "optimizer": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "schedule": "step",
    }

    def __init__(self, teacher, image_shape, num_classes, device="cpu", seed=0, images=None, ranks=None, **options):
        """``ranks``: ``(rank, world_size)`` to draw this rank's share of the kept images without a
        process group (default: the initialised process group's, if any)."""
        super().__init__(teacher, image_shape, num_classes, device, seed, **options)
        if images is None:
            raise SynthesizerOptionError("method 'dfnd' needs the wild images: create_synthesizer('dfnd', ..., images=X)")
        self.streamed = isinstance(images, torch.utils.data.Dataset) and not isinstance(images, torch.Tensor)
        self.images = images if self.streamed else self._checked_tensor(images)
        if len(self.images) == 0:
            raise SynthesizerOptionError("method 'dfnd': the wild image set is empty")
        if self.streamed and tuple(image_of(self.images[0]).shape) != self.image_shape:
            raise SynthesizerOptionError(f"method 'dfnd': the image set gives {tuple(image_of(self.images[0]).shape)} images, "
                                         f"the teacher takes {self.image_shape}")
        accuracy = self.options["teacher_accuracy"]
        if not 0.0 < accuracy <= 1.0 or not 0.0 < self.options["select_fraction"] <= 1.0:
            raise SynthesizerOptionError("method 'dfnd': teacher_accuracy and select_fraction must be in (0, 1]")
        self.noise = torch.nn.Parameter(torch.zeros(self.num_classes, self.num_classes - 1, device=self.device))
        self.noise_optimizer = torch.optim.Adam([self.noise], lr=self.options["noise_lr"])
        self.selected: torch.Tensor | None = None  # indices into the wild set (on the CPU)
        self.selected_per_class: list[int] | None = None
        self.pool: torch.Tensor | None = None  # the kept images, when the wild set is a tensor
        self._order, self._cursor = None, 0
        self._terms: dict[str, torch.Tensor] = {}
        try:  # under torchrun: (rank, world_size, shared seed) of the passes over the kept images
            self._ranks = resolve_share(ranks, seed, self.device)
        except DatasetError as err:
            raise SynthesizerOptionError(f"method 'dfnd': {err}") from None
        self.share: ShareBatches | None = None

    def _checked_tensor(self, images) -> torch.Tensor:
        images = torch.as_tensor(images)
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise SynthesizerOptionError(f"method 'dfnd': images must be an N x {' x '.join(map(str, self.image_shape))} "
                                         f"tensor, got {tuple(images.shape)}")
        if not images.is_floating_point() or float(images.min()) < 0 or float(images.max()) > 1:
            raise SynthesizerOptionError("method 'dfnd': images must be floats in [0, 1]")
        return images

    # -- selection -------------------------------------------------------------------------
    def _chunks(self):
        n, step = len(self.images), int(self.options["selection_batch_size"])
        for start in range(0, n, step):
            if self.streamed:
                yield torch.stack([image_of(self.images[i]) for i in range(start, min(n, start + step))]).to(self.device)
            else:
                yield self.images[start:start + step].to(self.device, non_blocking=True)

    def select(self) -> torch.Tensor:
        """Score every wild image with the teacher (batched, on ``device``) and keep DFND's
        selection; returns the kept indices."""
        scores, preds = [], []
        for chunk in self._chunks():
            score, pred = selection_scores(self.teacher_logits(chunk))
            scores.append(score)
            preds.append(pred)
        scores, preds = torch.cat(scores), torch.cat(preds)
        k = self.options["num_select"] or max(1, round(self.options["select_fraction"] * len(scores)))
        keep = select_indices(scores, preds, k, self.num_classes, self.options["class_balanced"])
        counts = torch.bincount(preds[keep], minlength=self.num_classes)
        self._set_selection(keep.cpu(), counts.cpu().tolist())
        return self.selected

    def _set_selection(self, indices: torch.Tensor, per_class: list[int]) -> None:
        if indices.numel() == 0:
            raise SynthesizerOptionError("method 'dfnd': no wild image was selected (num_select too small?)")
        self.selected, self.selected_per_class = indices.long(), [int(c) for c in per_class]
        if not self.streamed:
            self.pool = self.images[self.selected].to(self.device)
        if self._ranks is not None:
            rank, world_size, seed = self._ranks
            self.share = ShareBatches(self.selected.numel(), self.batch_size, num_replicas=world_size, rank=rank, seed=seed)
        self._terms = {"selected": torch.tensor(float(indices.numel()), device=self.device)}

    # -- the interface ---------------------------------------------------------------------
    def synthesize(self, student):
        if self.selected is None:
            self.select()
        return dict(self._terms)

    def _next_indices(self) -> torch.Tensor:
        """Positions in the kept set for one batch: shuffled epochs (a new order when one ends);
        under torchrun this rank's share of each epoch (:class:`dfkd.data.sampling.ShareBatches`)."""
        if self.share is not None:
            return torch.tensor(self.share.next_batch(), dtype=torch.long)
        n, parts, need = self.selected.numel(), [], self.batch_size
        while need > 0:
            if self._order is None or self._cursor >= n:
                self._order, self._cursor = torch.randperm(n, generator=self.rng), 0
            part = self._order[self._cursor:self._cursor + need]
            self._cursor += part.numel()
            need -= part.numel()
            parts.append(part)
        return torch.cat(parts)

    def sample(self):
        if self.selected is None:
            self.select()
        positions = self._next_indices()
        if self.streamed:
            chosen = self.selected[positions].tolist()
            images = torch.stack([image_of(self.images[i]) for i in chosen]).to(self.device, non_blocking=True)
        else:
            images = self.pool[positions.to(self.device)]
        if self.options["augment"]:
            images = augment_batch(images, pad=self.options["pad"], flip=self.options["flip"])
        return SyntheticBatch(images)

    def noise_matrix(self) -> torch.Tensor:
        return noise_adaptation_matrix(self.noise, self.options["teacher_accuracy"])

    def _step_noise(self) -> None:
        """Adam step of ``W`` on the gradient the last backward pass left (if any), then clear it."""
        if self.noise.grad is None:
            return
        grad = self.noise.grad
        grad.copy_(torch.where(torch.isfinite(grad), grad, torch.zeros_like(grad)))  # an fp16 overflow step
        self.noise_optimizer.step()
        self.noise_optimizer.zero_grad(set_to_none=True)

    def student_losses(self, student, batch):
        self._step_noise()
        teacher_logits = batch.teacher_logits if batch.teacher_logits is not None else self.teacher_logits(batch.images)
        with self.autocast():
            student_logits = student(batch.images).float()
        terms = {"kd": kd_loss(student_logits, teacher_logits, self.temperature)}
        if self.options["noise_weight"]:
            labels = teacher_logits.argmax(dim=1)
            terms["noise"] = self.options["noise_weight"] * noisy_nll(student_logits, labels, self.noise_matrix())
        return terms, student_logits, teacher_logits

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(noise=self.noise.detach().cpu().clone(), noise_optimizer=self.noise_optimizer.state_dict(),
                     selected=self.selected, selected_per_class=self.selected_per_class, order=self._order,
                     cursor=self._cursor, share=None if self.share is None else self.share.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            self.noise.copy_(state["noise"].to(self.device))
        self.noise_optimizer.load_state_dict(state["noise_optimizer"])
        if state.get("selected") is not None:
            self._set_selection(state["selected"], state["selected_per_class"])
        self._order, self._cursor = state.get("order"), int(state.get("cursor", 0))
        if self.share is not None and state.get("share") is not None:
            self.share.load_state_dict(state["share"])

    def describe(self) -> dict:
        info = super().describe()
        if self.selected is not None:
            info.update(selected=int(self.selected.numel()), selected_per_class=list(self.selected_per_class))
        return info

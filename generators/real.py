"""Real images: the upper bound a data-free method is compared against.

``create_synthesizer("real", teacher, images=X, ...)`` samples random batches of the given
real, *unlabeled* images (``N x C x H x W`` in ``[0,1]``, e.g. the training split of the
teachers' data set with its labels thrown away) — or, streamed from disk a batch at a time,
of a map-style data set of ``C x H x W`` images (e.g. :class:`dfkd.data.folder.ImageFolderSet`,
a transfer-set folder), so memory does not grow with the set — augmented per sample with a random crop
(2 px zero padding) and horizontal flip (:func:`generators.base.augment_batch`). Nothing is
synthesized: ``synthesize`` returns ``{}``. The student learns from the teacher's outputs on
those images with the default KD loss, so the gap between a data-free method and ``real``
is the price of not having the data.
"""
from __future__ import annotations

import torch

from generators.base import Synthesizer, SynthesizerOptionError, SyntheticBatch, augment_batch, register_synthesizer


@register_synthesizer("real")
class RealImages(Synthesizer):
    """Random (augmented) batches of real unlabeled images; see the module docstring.

    Options: ``augment`` (crop + flip, default true), ``flip`` (the flip part; set false for
    digits-like data where mirrored images are not in the distribution), and the common
    student options (Adam, lr 1e-3, cosine schedule by default). The images are moved to
    ``device`` once; ``images_synthesized`` stays 0.
    """

    takes_images = True
    defaults = {
        "batch_size": 128,
        "augment": True,
        "flip": False,
        "student_steps_per_round": 1,
    }
    student_recipe = {
        "optimizer": "adam",
        "lr": 1e-3,
        "schedule": "cosine",
    }

    def __init__(self, teacher, image_shape, num_classes, device="cpu", seed=0, images=None, **options):
        super().__init__(teacher, image_shape, num_classes, device, seed, **options)
        if images is None:
            raise SynthesizerOptionError("method 'real' needs the real images: create_synthesizer('real', ..., images=X)")
        if isinstance(images, torch.utils.data.Dataset) and not isinstance(images, torch.Tensor):
            self._check_streamed(images)
            self.images, self.streamed = images, True
            return
        images = torch.as_tensor(images)
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape or images.shape[0] == 0:
            raise SynthesizerOptionError(
                f"method 'real': images must be a non-empty N x {' x '.join(map(str, self.image_shape))} tensor, "
                f"got {tuple(images.shape)}"
            )
        if not images.is_floating_point() or float(images.min()) < 0 or float(images.max()) > 1:
            raise SynthesizerOptionError("method 'real': images must be floats in [0, 1]")
        self.images, self.streamed = images.to(self.device), False

    def _check_streamed(self, dataset) -> None:
        if len(dataset) == 0:
            raise SynthesizerOptionError("method 'real': the image set is empty")
        first = dataset[0]
        if tuple(first.shape) != self.image_shape:
            raise SynthesizerOptionError(f"method 'real': the image set gives {tuple(first.shape)} images, "
                                         f"the teacher takes {self.image_shape}")

    def _batch(self, idx: torch.Tensor) -> torch.Tensor:
        if not self.streamed:
            return self.images[idx.to(self.device)]
        return torch.stack([self.images[i] for i in idx.tolist()]).to(self.device, non_blocking=True)

    def synthesize(self, student):
        return {}

    def sample(self):
        idx = torch.randint(0, len(self.images), (self.batch_size,), generator=self.rng)
        images = self._batch(idx)
        if self.options["augment"]:
            images = augment_batch(images, flip=self.options["flip"])
        return SyntheticBatch(images)

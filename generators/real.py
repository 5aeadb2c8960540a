"""Real images: the upper bound a data-free method is compared against.

``create_synthesizer("real", teacher, images=X, ...)`` samples random batches of the given
real, *unlabeled* images (``N x C x H x W`` in ``[0,1]``, e.g. the training split of the
teachers' data set with its labels thrown away) — or, streamed through a
:class:`torch.utils.data.DataLoader` a batch at a time, of a map-style data set of
``C x H x W`` images or ``(image, label)`` pairs (e.g. :class:`dfkd.data.folder.ImageFolderSet`,
a transfer-set folder, or :func:`dfkd.data.open_dataset`'s split, whose labels are unused), so
memory does not grow with the set — augmented per sample with a random crop (2 px zero
padding) and horizontal flip (:func:`generators.base.augment_batch`). Nothing is
synthesized: ``synthesize`` returns ``{}``. The student learns from the teacher's outputs on
those images with the default KD loss, so the gap between a data-free method and ``real``
is the price of not having the data.

One process draws each batch uniformly with replacement from its seeded generator. Under
``torchrun`` (a process group of more than one rank) every pass over the images is split by
:class:`torch.utils.data.distributed.DistributedSampler` (:class:`dfkd.data.sampling.ShareBatches`,
seeded alike on every rank), so the ranks learn from disjoint shares of each pass; the position
in the pass is part of :meth:`RealImages.state_dict`, so a resumed run continues it.
"""
from __future__ import annotations

import torch

from dfkd.data.sampling import RandomBatches, ShareBatches, batches_loader, resolve_share
from dfkd.data.types import DatasetError, image_of
from generators.base import Synthesizer, SynthesizerOptionError, SyntheticBatch, augment_batch, register_synthesizer


@register_synthesizer("real")
class RealImages(Synthesizer):
    """Random (augmented) batches of real unlabeled images; see the module docstring.

    Options: ``augment`` (crop + flip, default true), ``flip`` (the flip part; set false for
    digits-like data where mirrored images are not in the distribution), and the common
    student options (Adam, lr 1e-3, cosine schedule by default). A tensor of images is moved
    to ``device`` once; a data set is read through a DataLoader, one batch per ``sample``;
    ``images_synthesized`` stays 0.
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

    def __init__(self, teacher, image_shape, num_classes, device="cpu", seed=0, images=None, ranks=None, **options):
        """``ranks``: ``(rank, world_size)`` to draw this rank's share without a process group
        (default: the initialised process group's, if any)."""
        super().__init__(teacher, image_shape, num_classes, device, seed, **options)
        if images is None:
            raise SynthesizerOptionError("method 'real' needs the real images: create_synthesizer('real', ..., images=X)")
        if isinstance(images, torch.utils.data.Dataset) and not isinstance(images, torch.Tensor):
            self._check_streamed(images)
            self.images, self.streamed = images, True
        else:
            self.images, self.streamed = self._checked_tensor(images).to(self.device), False
        self.share = self._share_batches(ranks, seed)
        self._loader = None
        if self.streamed:
            self._loader = batches_loader(self.images, self.share or RandomBatches(len(self.images), self.batch_size, self.rng))

    def _checked_tensor(self, images) -> torch.Tensor:
        images = torch.as_tensor(images)
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape or images.shape[0] == 0:
            raise SynthesizerOptionError(
                f"method 'real': images must be a non-empty N x {' x '.join(map(str, self.image_shape))} tensor, "
                f"got {tuple(images.shape)}"
            )
        if not images.is_floating_point() or float(images.min()) < 0 or float(images.max()) > 1:
            raise SynthesizerOptionError("method 'real': images must be floats in [0, 1]")
        return images

    def _check_streamed(self, dataset) -> None:
        if len(dataset) == 0:
            raise SynthesizerOptionError("method 'real': the image set is empty")
        first = image_of(dataset[0])
        if tuple(first.shape) != self.image_shape:
            raise SynthesizerOptionError(f"method 'real': the image set gives {tuple(first.shape)} images, "
                                         f"the teacher takes {self.image_shape}")

    def _share_batches(self, ranks, seed) -> ShareBatches | None:
        """This rank's shares of the passes over the images when several processes draw them."""
        try:
            share = resolve_share(ranks, seed, self.device)
        except DatasetError as err:
            raise SynthesizerOptionError(f"method 'real': {err}") from None
        if share is None:
            return None
        rank, world_size, seed = share
        return ShareBatches(len(self.images), self.batch_size, num_replicas=world_size, rank=rank, seed=seed)

    def synthesize(self, student):
        return {}

    def sample(self):
        if self.streamed:
            images = image_of(next(self._loader)).to(self.device, non_blocking=True)
        else:
            idx = (torch.tensor(self.share.next_batch()) if self.share is not None
                   else torch.randint(0, len(self.images), (self.batch_size,), generator=self.rng))
            images = self.images[idx.to(self.device)]
        if self.options["augment"]:
            images = augment_batch(images, flip=self.options["flip"])
        return SyntheticBatch(images)

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.share is not None:
            state["share"] = self.share.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.share is not None and state.get("share") is not None:
            self.share.load_state_dict(state["share"])



"""The bounded image bank that synthesizers keep their images in."""
from __future__ import annotations

import torch


class ImagePool:
    """A bounded memory bank of synthesized images (as DeepInversion's saved batches and
    CMI/Fast's memory banks). Policy: first-in-first-out — once ``capacity`` images are
    held, each new batch replaces the oldest.

    Each image may carry a class label (e.g. the teacher's prediction when it was added).
    Sampling is uniform over what is held, or, with ``balanced=True``, uniform over the
    labels seen and then uniform within the drawn label (each image is weighted by
    ``1 / count(its label)``), so that a class the generator rarely produces is not rarely
    taught."""

    def __init__(self, capacity: int):
        if capacity <= 0:
            raise ValueError("pool capacity must be positive")
        self.capacity = int(capacity)
        self.images: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.cursor = 0  # next slot to overwrite once full
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def _write(self, store: torch.Tensor, values: torch.Tensor) -> None:
        n, end = values.shape[0], self.cursor + values.shape[0]
        if end <= self.capacity:
            store[self.cursor : end] = values
        else:
            first = self.capacity - self.cursor
            store[self.cursor :] = values[:first]
            store[: n - first] = values[first:]

    def _grown(self, store: torch.Tensor, incoming: int) -> torch.Tensor:
        """``store`` with room for ``incoming`` more images: storage grows by doubling up to
        ``capacity`` as the pool fills, so a large capacity costs memory only once it is used."""
        needed = min(self.capacity, self.count + incoming)
        if store.shape[0] >= needed:
            return store
        size = min(self.capacity, max(needed, 2 * store.shape[0]))
        bigger = torch.empty((size, *store.shape[1:]), dtype=store.dtype, device=store.device)
        bigger[: self.count] = store[: self.count]
        return bigger

    def add(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Append a batch (and its labels; a pool holds labels for all images or none)."""
        images = images.detach()
        if labels is not None:
            labels = labels.detach().long().view(-1)
            if labels.shape[0] != images.shape[0]:
                raise ValueError(f"pool: {images.shape[0]} images but {labels.shape[0]} labels")
        if (labels is None) != (self.labels is None) and self.count:
            raise ValueError("pool: add labels with every batch or with none")
        if images.shape[0] > self.capacity:
            images = images[-self.capacity :]
            labels = None if labels is None else labels[-self.capacity :]
        if self.images is None:
            self.images = torch.empty((0, *images.shape[1:]), dtype=images.dtype, device=images.device)
        if labels is not None and self.labels is None:
            self.labels = torch.zeros(self.images.shape[0], dtype=torch.long, device=images.device)
        self.images = self._grown(self.images, images.shape[0])
        if self.labels is not None:
            self.labels = self._grown(self.labels, images.shape[0])
        self._write(self.images, images)
        if labels is not None:
            self._write(self.labels, labels.to(self.labels.device))
        self.cursor = (self.cursor + images.shape[0]) % self.capacity
        self.count = min(self.capacity, self.count + images.shape[0])

    def sample_indices(self, batch_size: int, generator: torch.Generator | None = None,
                       balanced: bool = False) -> torch.Tensor:
        """Positions of ``batch_size`` held images, drawn with replacement (class-balanced when
        ``balanced`` and the pool holds labels), without a host synchronisation (what
        :meth:`sample` draws; a subclass that keeps more per image reads it at the same positions)."""
        if self.count == 0:
            raise RuntimeError("the image pool is empty: synthesize before sampling")
        if balanced and self.labels is not None:
            held = self.labels[: self.count]
            per_label = torch.bincount(held)
            cdf = torch.cumsum(1.0 / per_label[held].double(), 0)
            u = torch.rand(batch_size, generator=generator, dtype=torch.float64).to(cdf.device) * cdf[-1]
            return torch.searchsorted(cdf, u).clamp_(max=self.count - 1)
        return torch.randint(0, self.count, (batch_size,), generator=generator).to(self.images.device)

    def sample(self, batch_size: int, generator: torch.Generator | None = None, balanced: bool = False) -> torch.Tensor:
        """``batch_size`` held images at :meth:`sample_indices`."""
        return self.images[self.sample_indices(batch_size, generator, balanced)]

    def label_counts(self, num_classes: int) -> torch.Tensor:
        """Images held per label (zeros when the pool holds no labels)."""
        if self.labels is None or self.count == 0:
            return torch.zeros(num_classes, dtype=torch.long)
        return torch.bincount(self.labels[: self.count].cpu(), minlength=num_classes)

    def state_dict(self) -> dict:
        held = None if self.images is None else self.images[: self.count].cpu().clone()
        labels = None if self.labels is None else self.labels[: self.count].cpu().clone()
        return {"capacity": self.capacity, "cursor": self.cursor, "count": self.count, "images": held, "labels": labels}

    def load_state_dict(self, state: dict, device=None) -> None:
        self.capacity, self.cursor, self.count = int(state["capacity"]), int(state["cursor"]), int(state["count"])
        self.images, self.labels = None, None
        if state["images"] is not None and self.count:
            held = state["images"].to(device) if device is not None else state["images"]
            self.images = held.clone()  # grows again as the pool fills (_grown)
            if state.get("labels") is not None:
                self.labels = state["labels"].to(held.device).clone()

"""Endless batches of indices into a set of images, for a ``DataLoader``'s ``batch_sampler``.

- :class:`RandomBatches`: one process; each batch drawn uniformly with replacement from a
  seeded generator (``torch.randint``), so a seed gives the same batches again.
- :class:`ShareBatches`: several processes (``torchrun``); each pass over the set is split by
  :class:`torch.utils.data.distributed.DistributedSampler` (shuffled with a seed all ranks
  share, ``set_epoch`` per pass), so the ranks draw disjoint shares of every pass. A batch
  that reaches the end of a pass continues with the next one. Its position (pass and offset)
  is a plain dict (:meth:`ShareBatches.state_dict`), so a resumed run continues where it was.

Both read their state at each batch, so a ``DataLoader`` without workers (which asks for one
batch at a time) stays exactly at the batch last taken.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler

from dfkd.data.types import DatasetError


def _positive(value, what: str) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise DatasetError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


class RandomBatches:
    """``batch_size`` indices below ``count`` per batch, drawn with replacement from ``generator``."""

    def __init__(self, count: int, batch_size: int, generator: torch.Generator):
        self.count, self.batch_size = _positive(count, "the number of images"), _positive(batch_size, "batch_size")
        self.generator = generator

    def next_batch(self) -> list[int]:
        return torch.randint(0, self.count, (self.batch_size,), generator=self.generator).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_batch()


class ShareBatches:
    """``batch_size`` indices per batch from this rank's share of each shuffled pass over
    ``count`` items (see the module docstring). ``seed`` must be the same on every rank."""

    def __init__(self, count: int, batch_size: int, num_replicas: int, rank: int, seed: int):
        self.count, self.batch_size = _positive(count, "the number of images"), _positive(batch_size, "batch_size")
        self.sampler = DistributedSampler(range(self.count), num_replicas=num_replicas, rank=rank, shuffle=True,
                                          seed=int(seed))
        self.epoch, self.position = 0, 0
        self._share: list[int] | None = None

    def _current(self) -> list[int]:
        if self._share is None:
            self.sampler.set_epoch(self.epoch)
            self._share = list(self.sampler)
        return self._share

    def next_batch(self) -> list[int]:
        batch: list[int] = []
        while len(batch) < self.batch_size:
            share = self._current()
            part = share[self.position : self.position + self.batch_size - len(batch)]
            batch += part
            self.position += len(part)
            if self.position >= len(share):  # the pass is over: the next one, shuffled anew
                self.epoch, self.position, self._share = self.epoch + 1, 0, None
        return batch

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": int(self.epoch), "position": int(self.position)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._share = int(state["epoch"]), int(state["position"]), None


def resolve_share(ranks, seed: int, device) -> tuple[int, int, int] | None:
    """``(rank, world_size, seed)`` for :class:`ShareBatches`, or ``None`` for one process.

    ``ranks``: ``(rank, world_size)`` given by the caller (``seed`` used as it is), or ``None``:
    the initialised process group's, with rank 0's ``seed`` broadcast to every rank (each
    rank's own seed differs; the passes must be shuffled alike). Every rank must call it.
    """
    if ranks is None:
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return None
        shared = torch.tensor([int(seed)], dtype=torch.long, device=device)
        dist.broadcast(shared, 0)
        return dist.get_rank(), dist.get_world_size(), int(shared.item())
    rank, world_size = (int(v) for v in ranks)
    if not 0 <= rank < world_size:
        raise DatasetError(f"ranks {tuple(ranks)} is not (rank, world_size) with 0 <= rank < world_size")
    return (rank, world_size, int(seed)) if world_size > 1 else None


def batches_loader(dataset, batch_sampler) -> Iterator:
    """An endless iterator over a ``DataLoader`` of ``dataset`` batched by ``batch_sampler``
    (no worker processes: batches are read when asked for, in order)."""
    return iter(torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=0))

"""Several processes through torch's own distributed engine (``torchrun``), never one of ours.

``torchrun --nproc_per_node=N -m dfkd distill ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`init_from_env` then joins the process group (NCCL on CUDA, gloo on the
CPU) and gives each rank its device. The contract of a distributed run:

- every rank synthesizes its own share of the images, seeded by rank (:func:`rank_seed`);
- the student is wrapped in ``DistributedDataParallel``, so its weights stay identical on
  every rank; each rank's student batch is ``batch_size / world_size`` images
  (:func:`per_rank_batch` refuses a batch the world size does not divide, naming the nearest
  valid sizes), so the global batch is the one a single process uses;
- rank 0 alone writes the run directory; evaluation is sharded and reduced
  (:func:`shard`, :func:`all_gather_cat`); counts are summed over ranks (:func:`sum_int`).

With one process (no torchrun) every function here is the identity and nothing is imported
from ``torch.distributed`` beyond availability checks.
"""
from __future__ import annotations

import gc
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


class DistributedError(ValueError):
    """A distributed setting that cannot work (batch not divisible, another world size ...)."""


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank, the number of processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = World()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_env(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun describes (if any) and return this rank's world and
    device (``cuda:LOCAL_RANK`` on CUDA, the given device otherwise)."""
    if not launched_by_torchrun():
        return SINGLE, device
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return world, device


def shutdown() -> None:
    """Destroy the process group, after collecting unreachable objects: a DDP wrapper or an
    autograd graph of a collective left in a reference cycle holds the group, and a group that
    outlives ``destroy_process_group`` can abort the process at exit (gloo threads)."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def rank_seed(seed: int, world: World) -> int:
    """The seed of a rank's own draws (synthesis): rank 0 keeps ``seed``."""
    return int(seed) + 1_000_003 * world.rank


def per_rank_batch(batch_size: int, world: World, what: str = "batch_size") -> int:
    """``batch_size / world_size``, refused with the nearest valid sizes when not a whole number."""
    if batch_size % world.world_size == 0:
        return batch_size // world.world_size
    low = batch_size - batch_size % world.world_size
    high = low + world.world_size
    nearest = " or ".join(str(v) for v in (low, high) if v > 0)
    raise DistributedError(f"{what} {batch_size} cannot be split over {world.world_size} processes; "
                           f"use a multiple of {world.world_size}, e.g. {nearest}")


def shard(count: int, world: World) -> slice:
    """This rank's contiguous share of ``count`` items (the shares cover every item once)."""
    per = -(-count // world.world_size)
    start = min(count, world.rank * per)
    return slice(start, min(count, start + per))


def all_gather_cat(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """The ranks' tensors (of possibly different lengths) concatenated in rank order."""
    if not world.distributed:
        return tensor
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world.world_size)]
    dist.all_gather(sizes, size)
    longest = int(max(int(s) for s in sizes))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.zeros_like(padded) for _ in range(world.world_size)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(s)] for g, s in zip(gathered, sizes)])


def sum_int(value: int, world: World) -> int:
    """An integer count summed over the ranks."""
    if not world.distributed:
        return int(value)
    total = torch.tensor([int(value)], dtype=torch.long)
    dist.all_reduce(total)
    return int(total)


def wrap_student(student: nn.Module, world: World, device: torch.device) -> nn.Module:
    """The student as the engine trains it: DistributedDataParallel across ranks, else itself."""
    if not world.distributed:
        return student
    # a channels-last student's gradients do not share the strides of DDP's flat buckets; DDP then
    # copies them (the same bytes, other strides) and warns once per process: the copy is the cost
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None,
                                               gradient_as_bucket_view=True)  # no copy; any memory layout


def broadcast_buffers(module: nn.Module, world: World) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank, so that the replicas
    evaluate and save alike (DDP broadcasts them at the start of each forward; each rank's last
    training forward then moves its own copy)."""
    if world.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)


def average_gradients(parameters, world: World) -> None:
    """Average the gradients of parameters trained outside the DDP student (feature adapters)."""
    if not world.distributed:
        return
    for p in parameters:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world.world_size)


def all_min(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """The element-wise minimum over the ranks (flags that must hold on every rank)."""
    if world.distributed:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def mean_over_ranks(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """The element-wise mean over the ranks (logged loss terms)."""
    if world.distributed:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        tensor = tensor / world.world_size
    return tensor


def rank0_flags(world: World, device: torch.device, *values: bool) -> tuple[bool, ...]:
    """Rank 0's ``values`` on every rank: decisions taken from a clock or a signal (save now?
    stop now?) must be the same everywhere, or the ranks would wait on different collectives."""
    if not world.distributed:
        return tuple(bool(v) for v in values)
    flags = torch.tensor([int(bool(v)) for v in values], device=device)
    dist.broadcast(flags, 0)
    return tuple(bool(v) for v in flags.tolist())


def to_cpu(value):
    """``value`` (nested dicts, lists, tuples) with every tensor moved to the CPU: what one
    rank sends another must not name a device the other does not own."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value


def broadcast_object(value, world: World):
    """Rank 0's picklable ``value`` on every rank."""
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value, world: World) -> list | None:
    """Every rank's picklable ``value`` in rank order on rank 0 (``None`` elsewhere)."""
    if not world.distributed:
        return [value]
    found = [None] * world.world_size if world.is_main else None
    dist.gather_object(value, found, dst=0)
    return found


def replicas_differ(module: nn.Module, world: World) -> float:
    """The largest difference between any rank's parameters and rank 0's (0.0: identical),
    on every rank."""
    if not world.distributed:
        return 0.0
    flat = torch.cat([p.detach().float().flatten() for p in module.parameters()])
    reference = flat.clone()
    dist.broadcast(reference, 0)
    gap = (flat - reference).abs().max().reshape(1)
    dist.all_reduce(gap, op=dist.ReduceOp.MAX)
    return float(gap.item())

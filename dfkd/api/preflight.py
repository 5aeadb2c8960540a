"""Checks made before a run touches its directory: whether its batches fit in memory."""
from __future__ import annotations

import os

import torch

from dfkd.api.results import RunError

#: a batch needs at least this many times its images' bytes (activations and gradients)
MEMORY_FACTOR = 16


def available_memory(device: torch.device) -> int | None:
    """Bytes of memory on ``device`` (the GPU's, else the machine's RAM), or None if unknown."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.get_device_properties(device).total_memory)
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError, RuntimeError):
        return None


def check_memory(image_shape, options: dict, samples: int, device: torch.device, steps: int = 1,
                 student_batch: int | None = None) -> None:
    """Refuse a run whose batches cannot fit in memory, before anything is allocated: a batch
    (the larger of the student's, ``student_batch`` images or else ``batch_size``, and the
    synthesis batch) needs at least ``MEMORY_FACTOR`` x its images' float32 bytes (an image pool
    and the plot samples their own bytes: the pool as full as ``steps`` can fill it)."""
    per_image = 4
    for side in image_shape:
        per_image *= int(side)
    student = int(options.get("batch_size") or 0) if student_batch is None else int(student_batch)
    batch = max(student, int(options.get("synthesis_batch_size") or 0))
    rounds = -(-int(steps) // max(1, int(options.get("student_steps_per_round") or 1)))
    pool = min(int(options.get("pool_size") or 0), int(options.get("synthesis_batch_size") or 0) * rounds)
    need = per_image * (batch * MEMORY_FACTOR + pool + int(samples or 0))
    have = available_memory(device)
    if have is not None and need > have:
        shape = "x".join(str(int(v)) for v in image_shape)
        raise RunError(f"a batch of {batch:,} images of {shape} needs at least {need / 2**30:,.1f} GiB of memory, "
                       f"more than the {have / 2**30:,.1f} GiB of {device}; lower batch_size "
                       "(and options.synthesis_batch_size / options.pool_size)")

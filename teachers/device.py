"""The one device and precision policy of the package: which device a job runs on, how it is
seeded, when forward passes run in mixed precision, and batched inference under that policy.

- ``resolve_device("auto")`` picks CUDA, then MPS, then the CPU; a named device that this
  machine lacks, or a name that is not a device, is a :class:`DeviceError` saying what to use.
- ``autocast(device, precision)``: ``auto`` is bf16 autocast on CUDA and full precision
  elsewhere; ``fp32``, ``bf16`` and ``fp16`` choose explicitly (fp16 wants a gradient scaler).
- ``batched_logits(model, images, device)``: the model's logits on many images, in batches,
  under that autocast, returned as float32 on the CPU (evaluation, analysis, reports).
"""
from __future__ import annotations

import contextlib
import random

import torch
from torch import nn

DEVICE_HELP = "use auto, cpu, cuda, cuda:N or mps"


class DeviceError(ValueError):
    """A device this machine does not have, or a name that is not a device."""


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or ``None``) picks CUDA, then MPS, then CPU; anything else must name a device
    this machine has."""
    if name is None or str(name) in ("", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"--device {name}: not a device name; {DEVICE_HELP}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: CUDA is not available on this machine; use --device auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                              f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise DeviceError(f"--device {name}: MPS is not available on this machine; use --device auto or cpu")
    elif device.type != "cpu":
        raise DeviceError(f"--device {name}: dfkd runs on cpu, cuda and mps; {DEVICE_HELP}")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python's, torch's (every device) and numpy's global generators."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise DeviceError(f"--precision {precision}: use one of {', '.join(PRECISIONS)}")
    return precision


def autocast_dtype(device: torch.device | str, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``: ``auto`` is bf16 on CUDA and full
    precision elsewhere; ``fp32`` is full precision; ``bf16``/``fp16`` are those on any device
    (``None``: no autocast)."""
    check_precision(precision)
    if precision == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device | str, precision: str = "auto"):
    """Mixed precision of forward passes under the policy (:func:`autocast_dtype`)."""
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


@torch.no_grad()
def batched_logits(model: nn.Module, images: torch.Tensor, device, batch_size: int = 1000,
                   precision: str = "auto") -> torch.Tensor:
    """``model``'s logits on ``images`` (``N x C x H x W`` in [0, 1], any device), ``batch_size``
    at a time on ``device`` under :func:`autocast`, as float32 on the CPU. The model runs in
    eval mode and gets its train/eval mode back afterwards."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(device, non_blocking=True).float()
            if device.type == "cuda":
                batch = batch.contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):
                out.append(model(batch).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)

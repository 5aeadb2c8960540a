"""Supervised training and evaluation of classifiers on in-memory tensors.

The caller loads the data (``teachers`` does not import ``dfkd``): images are float
``N x C x H x W`` tensors in [0, 1], labels int64 in ``0..k-1``. Augmentation (random crop
with zero padding, optional horizontal flip) is done batched on the training device; there
are no DataLoader workers. On CUDA the loop uses bf16 autocast and channels-last memory, and
synchronises with the host only once per epoch.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from teachers.device import autocast, batched_logits, resolve_device

__all__ = ["default_recipe", "train_classifier", "evaluate_classifier", "classification_report", "random_crop_flip",
           "resolve_device"]

_OPTIMIZERS = {
    "adam": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0},
    "sgd": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
}
_AUGMENTS = ("crop", "crop_flip", "none")
_SCHEDULES = ("cosine", "constant")
_PAD = 2  # zero padding of the random crop


def default_recipe(arch: str | None) -> dict:
    """Optimiser defaults for an architecture name.

    LeNets and MLPs: Adam, lr 1e-3, no weight decay. Everything else (ResNets, WRNs,
    torchvision models): SGD, lr 0.05, momentum 0.9, Nesterov, weight decay 5e-4. Both use
    a cosine learning-rate schedule over all steps.
    """
    name = (arch or "").lower()
    key = "adam" if name.startswith(("lenet", "mlp")) else "sgd"
    return dict(_OPTIMIZERS[key])


def random_crop_flip(
    x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor | None = None, pad: int = 2
) -> torch.Tensor:
    """Batched random crop (zero padding ``pad``) and optional horizontal flip.

    ``offsets`` is ``(B, 2)`` integers in ``[0, 2 * pad]`` (row, column of the crop in the
    padded image); ``flips`` is ``(B,)`` bool or None. One gather; the result is laid out
    channels-last.
    """
    b, _c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dev = x.device
    rows = offsets[:, 0, None] + torch.arange(h, device=dev)  # (B, H)
    cols = torch.arange(w, device=dev).expand(b, w)
    if flips is not None:
        cols = torch.where(flips[:, None], (w - 1) - cols, cols)
    cols = offsets[:, 1, None] + cols  # (B, W)
    batch = torch.arange(b, device=dev)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    if p is None:
        p = next(model.buffers(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 1000,
    device: str | torch.device | None = None,
) -> dict:
    """Accuracy, per-class accuracy, predictions and confusion matrix of ``model`` on (x, y).

    ``device=None`` evaluates where the model is; otherwise the model is moved to ``device``.
    The model's train/eval mode is restored afterwards.

    Returns ``{"accuracy": float, "per_class_accuracy": [float or None (class absent)],
    "predictions": LongTensor (cpu), "confusion": k x k list of ints (rows: true class)}``
    with ``k`` the number of model outputs.
    """
    dev = _model_device(model) if device is None else resolve_device(device)
    model.to(dev)
    if len(x) == 0:
        raise ValueError("evaluate_classifier needs at least one example")
    return classification_report(batched_logits(model, x, dev, batch_size), y)


def classification_report(logits: torch.Tensor, y: torch.Tensor) -> dict:
    """What :func:`evaluate_classifier` returns, from a model's ``logits`` (N x k) and the labels ``y``."""
    k = logits.shape[1]
    pred = logits.argmax(1)
    y = y.detach().cpu().long()
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
        raise ValueError(f"labels must lie in 0..{k - 1} (the model has {k} outputs), got {int(y.min())}..{int(y.max())}")
    confusion = torch.bincount(y * k + pred, minlength=k * k).reshape(k, k)
    support = confusion.sum(1)
    per_class = [
        float(confusion[i, i]) / float(support[i]) if int(support[i]) > 0 else None for i in range(k)
    ]
    return {
        "accuracy": float((pred == y).float().mean()) if len(y) else float("nan"),
        "per_class_accuracy": per_class,
        "predictions": pred,
        "confusion": confusion.tolist(),
    }


def _make_optimizer(model: nn.Module, recipe: dict) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (was it frozen?)")
    if recipe["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    return torch.optim.SGD(
        params,
        lr=recipe["lr"],
        momentum=recipe.get("momentum", 0.9),
        nesterov=recipe.get("nesterov", True),
        weight_decay=recipe["weight_decay"],
    )


def _recipe_for(model: nn.Module, optimizer: str | None, lr: float | None, weight_decay: float | None) -> dict:
    arch = getattr(model, "arch", None) or type(getattr(model, "net", model)).__name__
    recipe = default_recipe(arch)
    if optimizer is not None:
        if optimizer not in _OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; known: {', '.join(_OPTIMIZERS)}")
        if optimizer != recipe["optimizer"]:
            recipe = dict(_OPTIMIZERS[optimizer])
    if lr is not None:
        recipe["lr"] = float(lr)
    if weight_decay is not None:
        recipe["weight_decay"] = float(weight_decay)
    return recipe


def train_classifier(
    model: nn.Module,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor | None,
    test_y: torch.Tensor | None,
    *,
    epochs: int,
    batch_size: int = 128,
    optimizer: str | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    augment: str = "crop",
    schedule: str = "cosine",
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    log: Callable[[dict], Any] | None = None,
) -> dict:
    """Train ``model`` (images in [0, 1] -> logits) with cross-entropy; return its metrics.

    Args:
        optimizer: ``"adam"`` or ``"sgd"``; None picks :func:`default_recipe` for the
            model's ``arch`` (or class name). ``lr`` / ``weight_decay`` override the recipe.
        augment: ``"crop"`` (random crop, 2 px zero padding), ``"crop_flip"`` (plus random
            horizontal flip) or ``"none"``.
        schedule: ``"cosine"`` (annealed to 0 over all steps) or ``"constant"`` (the
            learning rate stays the recipe's, as DAFL's official teacher training does).
        seed: seeds a ``torch.Generator`` for shuffling and augmentation (model
            initialisation is the caller's).
        device: ``"cpu"``, ``"cuda"``, ``"auto"``...; the model and data are moved there.
        log: called with each epoch's history row.

    Batches are drawn without replacement; an incomplete last batch is dropped (unless it
    is the only one). The learning rate follows ``schedule``. The test
    set is evaluated after every epoch for the history only; the reported
    ``test_accuracy`` is the final epoch's.

    Returns ``{"test_accuracy", "per_class_accuracy", "history": [{"epoch", "train_loss",
    "train_acc", "test_acc", "seconds"}], "seconds", "recipe"}``.
    """
    if getattr(model, "_frozen", False):
        raise ValueError("cannot train a frozen model")
    if augment not in _AUGMENTS:
        raise ValueError(f"unknown augment {augment!r}; known: {', '.join(_AUGMENTS)}")
    if train_x.ndim != 4 or not train_x.is_floating_point():
        raise ValueError(f"train_x must be a float N x C x H x W tensor, got {tuple(train_x.shape)} {train_x.dtype}")
    if len(train_x) != len(train_y) or len(train_x) == 0:
        raise ValueError(f"train_x and train_y must have the same non-zero length ({len(train_x)} vs {len(train_y)})")
    if epochs < 1:
        raise ValueError("epochs must be >= 1")
    if schedule not in _SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(_SCHEDULES)}")

    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    recipe = _recipe_for(model, optimizer, lr, weight_decay)
    recipe.update(augment=augment, schedule=schedule, epochs=epochs, batch_size=batch_size, seed=seed)
    model.to(dev)
    if cuda:
        model.to(memory_format=torch.channels_last)
    xs = train_x.to(dev)
    ys = train_y.to(dev).long()
    n = len(xs)
    bs = min(batch_size, n)
    steps = max(1, n // bs)
    opt = _make_optimizer(model, recipe)
    if schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    gen = torch.Generator().manual_seed(seed)

    history: list[dict] = []
    final = None
    start = time.perf_counter()
    bar = tqdm(range(1, epochs + 1), desc="train", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(n, generator=gen).to(dev)
        offsets = torch.randint(0, 2 * _PAD + 1, (n, 2), generator=gen).to(dev)
        flips = (torch.rand(n, generator=gen) < 0.5).to(dev) if augment == "crop_flip" else None
        loss_sum = torch.zeros((), device=dev)
        correct = torch.zeros((), device=dev, dtype=torch.long)
        for s in range(steps):
            sl = slice(s * bs, (s + 1) * bs)
            idx = perm[sl]
            xb, yb = xs[idx], ys[idx]
            if augment != "none":
                xb = random_crop_flip(xb, offsets[sl], None if flips is None else flips[sl], pad=_PAD)
            xb = xb.contiguous(memory_format=torch.channels_last) if cuda else xb.contiguous()
            with autocast(dev):
                logits = model(xb)
            loss = F.cross_entropy(logits.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach() * len(yb)
            correct += (logits.detach().argmax(1) == yb).sum()
        seen = steps * bs
        row = {
            "epoch": epoch,
            "train_loss": float(loss_sum) / seen,
            "train_acc": int(correct) / seen,
            "test_acc": None,
        }
        if test_x is not None and test_y is not None:
            final = evaluate_classifier(model, test_x, test_y, device=dev)
            row["test_acc"] = final["accuracy"]
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        if not math.isfinite(row["train_loss"]):
            raise FloatingPointError(f"training diverged at epoch {epoch} (loss {row['train_loss']})")
        postfix = {"loss": f"{row['train_loss']:.3f}", "acc": f"{row['train_acc']:.3f}"}
        if row["test_acc"] is not None:
            postfix["test"] = f"{row['test_acc']:.3f}"
        bar.set_postfix(postfix)
        if log is not None:
            log(dict(row))
    bar.close()
    model.eval()
    return {
        "test_accuracy": None if final is None else final["accuracy"],
        "per_class_accuracy": None if final is None else final["per_class_accuracy"],
        "history": history,
        "seconds": time.perf_counter() - start,
        "recipe": recipe,
    }

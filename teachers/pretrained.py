"""Pretrained classifiers as teachers, read from the local caches (never downloaded here).

A teacher may be named instead of given as a checkpoint file:

- ``tv:<name>:<weights>`` — a torchvision classifier with one of its weight names
  (``tv:resnet18:IMAGENET1K_V1``, ``tv:resnet50:DEFAULT``). The weights file is read from the
  torch hub cache (``$TORCH_HOME/hub/checkpoints/``, ``torch.hub.get_dir()``), where
  torchvision itself keeps what it downloads. Mean, std, input size and class names come
  from the weights' own metadata.
- ``timm:<name>`` — a timm model with its pretrained weights (the optional ``timm`` extra:
  ``pip install timm``), read from timm's cache (Hugging Face hub cache) with network access
  switched off. Mean, std and input size come from its ``pretrained_cfg``.

Offline, a missing file is a :class:`PretrainedError` that names the file expected and how to
put it there. The model comes back wrapped in :class:`teachers.NormalizedModel` with
checkpoint-style metadata, so it is used like any zoo teacher.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from teachers.normalize import NormalizedModel

__all__ = ["PretrainedError", "is_pretrained_spec", "load_pretrained"]


class PretrainedError(ValueError):
    """A pretrained teacher that cannot be had here (unknown name, missing file, no timm)."""


def is_pretrained_spec(spec) -> bool:
    """Whether ``spec`` names a pretrained model (``tv:NAME:WEIGHTS`` or ``timm:NAME``)."""
    text = str(spec)
    return (text.startswith("tv:") and text.count(":") == 2) or text.startswith("timm:")


def _meta(dataset: str, classes: int, names, mean, std, size: int, source: str) -> dict:
    return {"dataset": dataset, "classes": list(range(classes)),
            "class_names": list(names) if names else [str(k) for k in range(classes)],
            "mean": [float(v) for v in mean], "std": [float(v) for v in std], "image_shape": [3, size, size],
            "test_accuracy": None, "seed": None, "pretrained": source}


def _tv_block_paths(model: nn.Module) -> tuple[str, ...]:
    modules = dict(model.named_modules())
    return tuple(p for p in ("layer1", "layer2", "layer3", "layer4") if p in modules)


def load_tv_pretrained(name: str, weights_name: str, map_location="cpu") -> tuple[NormalizedModel, dict]:
    """torchvision's ``name`` with its weights ``weights_name`` from the torch hub cache."""
    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        raise PretrainedError(f"tv:{name}: torchvision has no model of that name with weights; "
                              f"see torchvision.models.list_models()") from None
    try:
        weights = enum[weights_name] if weights_name != "DEFAULT" else enum.DEFAULT
    except KeyError:
        raise PretrainedError(f"tv:{name}:{weights_name}: unknown weights; torchvision has "
                              f"{', '.join(enum.__members__)}") from None
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if not path.is_file():
        raise PretrainedError(
            f"tv:{name}:{weights_name}: the weights file is not in the torch hub cache; expected {path} "
            f"(copy it there from a machine with network access, where torchvision.models.get_model("
            f"'{name}', weights='{weights.name}') downloads it, or set TORCH_HOME to a folder holding hub/checkpoints/)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise PretrainedError(f"{path}: not a readable weights file ({type(exc).__name__}); replace it") from None
    categories = weights.meta.get("categories") or []
    net = torchvision.models.get_model(name, weights=None, num_classes=len(categories) or 1000)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise PretrainedError(f"{path}: its tensors do not fit tv:{name} ({str(exc).splitlines()[0]})") from None
    linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    net.head_path = linears[-1] if linears else None
    net.block_paths = _tv_block_paths(net)
    transforms = weights.transforms()
    size = int(transforms.crop_size[0])
    model = NormalizedModel(net, transforms.mean, transforms.std)
    model.arch = f"tv:{name}"
    meta = _meta("imagenet", len(categories) or 1000, categories, transforms.mean, transforms.std, size,
                 f"tv:{name}:{weights.name}")
    return model, meta


def load_timm_pretrained(name: str) -> tuple[NormalizedModel, dict]:
    """timm's ``name`` with its pretrained weights from timm's cache (no network)."""
    try:
        import timm
    except ImportError:
        raise PretrainedError(f"timm:{name} needs the optional timm package: pip install timm") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if name not in timm.list_models(pretrained=True):
        raise PretrainedError(f"timm:{name}: timm has no pretrained model of that name; see timm.list_models(pretrained=True)")
    try:
        net = timm.create_model(name, pretrained=True)
    except Exception as exc:
        raise PretrainedError(f"timm:{name}: its pretrained weights are not in the local cache "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); download them on a machine "
                              f"with network access (timm.create_model('{name}', pretrained=True)) and copy "
                              f"the Hugging Face cache folder (HF_HOME) here") from None
    cfg = net.pretrained_cfg
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    classes = int(getattr(net, "num_classes", 1000))
    linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    net.head_path = linears[-1] if linears else None
    net.block_paths = ()
    model = NormalizedModel(net, cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225)))
    model.arch = f"timm:{name}"
    return model, _meta("imagenet", classes, None, cfg.get("mean"), cfg.get("std"), size, f"timm:{name}")


def load_pretrained(spec: str, map_location="cpu") -> tuple[NormalizedModel, dict]:
    """The teacher a pretrained ``spec`` names (module docstring), with its metadata."""
    text = str(spec)
    if text.startswith("timm:"):
        return load_timm_pretrained(text[len("timm:"):])
    if text.startswith("tv:") and text.count(":") == 2:
        _, name, weights = text.split(":")
        return load_tv_pretrained(name, weights, map_location)
    raise PretrainedError(f"{spec!r} names no pretrained model; use tv:NAME:WEIGHTS (e.g. tv:resnet18:IMAGENET1K_V1) "
                          "or timm:NAME")

"""Stock torchvision classifiers as dfkd models (``tv:<torchvision name>``).

``create_tv_model("resnet18", ...)`` builds ``torchvision.models.get_model(name, weights=None,
num_classes=...)`` (never downloads anything) and then

* replaces the first convolution by one reading ``in_channels`` channels;
* for small images (``image_size <= 64``) turns an overlapping strided stem into a stride-1
  one (7x7 kernels become 3x3) and drops the stem max pooling (``maxpool`` of ResNets and
  ShuffleNet, ``features.pool0`` of DenseNet, ``maxpool1`` of GoogLeNet). Patchifying stems
  (kernel == stride: ConvNeXt, Swin, ViT) are left alone;
* sets ``head_path`` (the last ``nn.Linear``) and ``block_paths`` (ResNets: ``layer1..4``;
  RegNet: ``trunk_output.block1..4``; ShuffleNet: ``stage2..4``; models with a ``features``
  or ``layers`` sequence: the last module at each spatial resolution, found by a dummy
  forward; otherwise ``()``).

The forward pass is torchvision's own, unmodified: features are tapped with hooks.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

from teachers.registry import UnknownModelError, unknown_model_message

__all__ = ["create_tv_model", "list_tv_models", "SMALL_IMAGE_MAX"]

SMALL_IMAGE_MAX = 64
_STEM_POOLS = ("maxpool", "features.pool0", "maxpool1")


def list_tv_models() -> list[str]:
    """Names of torchvision's image classification models."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def _adapt_stem(model: nn.Module, in_channels: int, small: bool) -> None:
    path, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    kernel, stride, padding = conv.kernel_size, conv.stride, conv.padding
    patchify = kernel == stride
    shrink = small and not patchify and stride != (1, 1)
    if shrink:
        stride = (1, 1)
        if kernel[0] >= 7:
            kernel, padding = (3, 3), (1, 1)
    if not shrink and in_channels == conv.in_channels:
        return
    new = nn.Conv2d(
        in_channels, conv.out_channels, kernel, stride=stride, padding=padding,
        dilation=conv.dilation, bias=conv.bias is not None,
    )
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    _set_submodule(model, path, new)
    if shrink:
        names = dict(model.named_modules())
        for pool in _STEM_POOLS:
            if isinstance(names.get(pool), nn.MaxPool2d):
                _set_submodule(model, pool, nn.Identity())


def _stage_ends(model: nn.Module, seq_path: str, in_channels: int, image_size: int) -> tuple[str, ...]:
    """Last child of ``seq_path`` at each spatial resolution (one dummy forward, eval mode)."""
    seq = model.get_submodule(seq_path)
    names = [n for n, _ in seq.named_children()]
    sizes: dict[str, tuple] = {}
    hooks = [
        child.register_forward_hook(lambda m, i, o, n=n: sizes.__setitem__(n, tuple(o.shape[-2:])))
        for n, child in seq.named_children()
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, in_channels, image_size, image_size))
    except Exception:  # too small an input for this family: no taps rather than no model
        return ()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    seen = [n for n in names if n in sizes]
    ends = [a for a, b in zip(seen, seen[1:]) if sizes[a] != sizes[b]]
    if seen:
        ends.append(seen[-1])
    return tuple(f"{seq_path}.{n}" for n in ends)


def _block_paths(model: nn.Module, name: str, in_channels: int, image_size: int) -> tuple[str, ...]:
    modules = dict(model.named_modules())
    if all(f"layer{i}" in modules for i in range(1, 5)):
        return tuple(f"layer{i}" for i in range(1, 5))
    if "trunk_output" in modules:
        return tuple(f"trunk_output.{n}" for n, _ in modules["trunk_output"].named_children())
    if all(f"stage{i}" in modules for i in range(2, 5)):
        return ("stage2", "stage3", "stage4")
    if name.startswith(("vit_", "swin_")):
        return ()
    for seq in ("features", "layers"):
        if isinstance(modules.get(seq), nn.Sequential):
            return _stage_ends(model, seq, in_channels, image_size)
    return ()


def create_tv_model(name: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, **kwargs) -> nn.Module:
    """Build torchvision's ``name`` with ``weights=None`` adapted to dfkd (see module doc)."""
    known = list_tv_models()
    if name not in known:
        raise UnknownModelError(
            unknown_model_message(f"tv:{name}") + f" Torchvision classifiers: {', '.join(known)}."
        )
    if kwargs.get("weights") is not None:
        raise ValueError("dfkd builds torchvision models with weights=None; import weights with import_state_dict")
    kwargs["weights"] = None
    if name.startswith("vit_"):
        kwargs.setdefault("image_size", image_size)
    if name in ("googlenet", "inception_v3"):
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", True)
    model = torchvision.models.get_model(name, num_classes=num_classes, **kwargs)
    _adapt_stem(model, in_channels, small=image_size <= SMALL_IMAGE_MAX)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"tv:{name} has no nn.Linear classifier head; dfkd models need one (head_path)")
    model.head_path = linears[-1]
    model.block_paths = _block_paths(model, name, in_channels, image_size)
    return model

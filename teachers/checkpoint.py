"""dfkd checkpoints: plain dicts of tensors and plain Python values, written atomically.

Format ``dfkd-checkpoint/1``::

    {"format": "dfkd-checkpoint/1",
     "arch": "lenet5_bn",
     "arch_kwargs": {"num_classes": 10, "in_channels": 1, "image_size": 32, ...},
     "state_dict": {name: tensor},   # of the NormalizedModel, incl. its mean/std buffers
     "meta": {"dataset", "classes", "class_names", "mean", "std", "image_shape",
              "test_accuracy", "seed", "created", ... anything else plain (e.g. "config")}}

Files are always read with ``torch.load(..., weights_only=True)``: a file that would need
arbitrary unpickling is refused, never executed. Reading also refuses NaN/inf weights and an
``arch_kwargs["num_classes"]`` that differs from ``len(meta["classes"])``; writing refuses both too.
"""
from __future__ import annotations

import datetime as _dt
import io
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from teachers.files import atomic_write, sha256_file, torch_save  # noqa: F401  (atomic_write, sha256_file: re-exported)
from teachers.normalize import NormalizedModel, build_model
from teachers.registry import UnknownModelError

__all__ = [
    "CHECKPOINT_FORMAT",
    "KNOWN_FORMATS",
    "REQUIRED_META",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "import_state_dict",
    "sha256_file",
    "atomic_write",
    "check_state_dict",
]

CHECKPOINT_FORMAT = "dfkd-checkpoint/1"
KNOWN_FORMATS = (CHECKPOINT_FORMAT,)
REQUIRED_META = ("dataset", "classes", "class_names", "mean", "std", "image_shape", "test_accuracy", "seed")
_PREFIXES = ("module.", "net.")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, unsafe, of an unknown format or does not fit its arch."""


# --------------------------------------------------------------------------- helpers
def _plain(value: Any, where: str) -> Any:
    """Convert ``value`` to plain Python values and tensors, or raise CheckpointError."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise CheckpointError(f"{where}: key {k!r} is not a str or int")
            out[k] = _plain(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if type(value).__module__ == "numpy":  # numpy scalars and arrays
        return _plain(value.tolist(), where)
    raise CheckpointError(f"{where}: {type(value).__name__} is not a plain value (use str/int/float/list/dict/tensor)")


def _validate_meta(meta: Any, source: str) -> None:
    if not isinstance(meta, Mapping):
        raise CheckpointError(f"{source}: meta must be a dict, got {type(meta).__name__}")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise CheckpointError(f"{source}: meta lacks required keys: {', '.join(missing)} (required: {', '.join(REQUIRED_META)})")
    for key in ("classes", "class_names", "image_shape", "mean", "std"):
        if not isinstance(meta[key], (list, tuple)):
            raise CheckpointError(f"{source}: meta {key} must be a list, got {meta[key]!r}")
    acc = meta["test_accuracy"]
    if acc is not None and not (isinstance(acc, (int, float)) and 0.0 <= float(acc) <= 1.0):
        raise CheckpointError(f"{source}: meta test_accuracy must be a float in [0, 1] or None, got {acc!r}")
    if len(meta["classes"]) != len(meta["class_names"]):
        raise CheckpointError(
            f"{source}: meta has {len(meta['classes'])} classes but {len(meta['class_names'])} class_names"
        )
    if len(meta["image_shape"]) != 3:
        raise CheckpointError(f"{source}: meta image_shape must be [C, H, W], got {meta['image_shape']!r}")


def _shape(t: torch.Tensor) -> str:
    return "(" + ",".join(str(s) for s in t.shape) + ")"


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise CheckpointError naming missing keys, unexpected keys and shape mismatches."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {_shape(state_dict[k])} vs model {_shape(v)}"
        for k, v in expected.items()
        if k in state_dict and isinstance(state_dict[k], torch.Tensor) and state_dict[k].shape != v.shape
    ]
    not_tensors = [k for k in state_dict if k in expected and not isinstance(state_dict[k], torch.Tensor)]
    if not (missing or unexpected or mismatched or not_tensors):
        return
    lines = [f"{what}: the state dict does not fit the model"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if mismatched:
        lines.append("  shape mismatches:\n    " + "\n    ".join(mismatched))
    if not_tensors:
        lines.append(f"  not tensors: {', '.join(not_tensors)}")
    raise CheckpointError("\n".join(lines))


def _torch_load(source: str | os.PathLike | bytes, name: str, map_location) -> Any:
    """``torch.load(weights_only=True)`` with dfkd's error messages."""
    if isinstance(source, (bytes, bytearray)):
        fileobj: Any = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.exists():
            raise CheckpointError(f"checkpoint not found: {path}")
        if not path.is_file():
            raise CheckpointError(f"not a file: {path}")
        fileobj = path
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(fileobj, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Weights only load failed" in msg:
            detail = next(
                (ln.strip() for ln in msg.splitlines() if "GLOBAL" in ln or "Unsupported" in ln or "unsupported" in ln),
                "",
            )
            raise CheckpointError(
                f"{name}: refused: not a plain tensor checkpoint; dfkd never unpickles code"
                + (f" ({detail})" if detail else "")
            ) from None
        raise CheckpointError(f"{name} is truncated or not a PyTorch file ({msg.strip()[:200]})") from None
    except Exception as e:  # zip, struct, EOF, key errors...: whatever a damaged file raises
        raise CheckpointError(f"{name} is truncated or not a PyTorch file ({type(e).__name__}: {str(e)[:200]})") from None


def _format_error(name: str, obj: Any) -> CheckpointError:
    known = ", ".join(KNOWN_FORMATS)
    if isinstance(obj, Mapping) and "format" in obj:
        head = f"{name}: unknown checkpoint format {obj['format']!r}"
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        head = f"{name}: this is a plain state dict, not a dfkd checkpoint (no 'format' key)"
    else:
        head = f"{name}: not a dfkd checkpoint (no 'format' key)"
    return CheckpointError(
        f"{head}. Known formats: {known}. Plain state dicts from elsewhere can be imported with "
        f"`dfkd import` (teachers.import_state_dict(src, dst, arch, arch_kwargs, meta))."
    )


def _check_finite(state_dict: Mapping[str, Any], name: str) -> None:
    """Raise CheckpointError if a floating tensor of ``state_dict`` holds NaN or inf."""
    bad = [k for k, v in state_dict.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(
            f"{name}: tensor {bad[0]!r} holds NaN/inf ({len(bad)} tensor(s) affected); the model diverged "
            "or the file is corrupt: retrain it or restore a good copy"
        )


def _validate(obj: Any, name: str) -> dict:
    if not isinstance(obj, Mapping) or obj.get("format") not in KNOWN_FORMATS:
        raise _format_error(name, obj)
    for key, typ in (("arch", str), ("arch_kwargs", Mapping), ("state_dict", Mapping), ("meta", Mapping)):
        if key not in obj:
            raise CheckpointError(f"{name}: checkpoint lacks {key!r}")
        if not isinstance(obj[key], typ):
            raise CheckpointError(f"{name}: {key!r} must be a {typ.__name__}, got {type(obj[key]).__name__}")
    _validate_meta(obj["meta"], name)
    n_out, n_classes = obj["arch_kwargs"].get("num_classes"), len(obj["meta"]["classes"])
    if n_out is not None and n_out != n_classes:
        raise CheckpointError(
            f"{name}: the model has {n_out} outputs but meta lists {n_classes} classes; "
            "the file was altered or written by another tool: re-save or re-import it"
        )
    _check_finite(obj["state_dict"], name)
    return dict(obj)


def _read(source, name: str, map_location="cpu") -> dict:
    return _validate(_torch_load(source, name, map_location), name)


def _complete_arch_kwargs(arch_kwargs: Mapping[str, Any], meta: Mapping[str, Any]) -> dict:
    """``arch_kwargs`` with num_classes / in_channels / image_size defaulted from ``meta``."""
    kwargs = dict(arch_kwargs)
    c, h, _w = meta["image_shape"]
    kwargs.setdefault("num_classes", len(meta["classes"]))
    kwargs.setdefault("in_channels", int(c))
    kwargs.setdefault("image_size", int(h))
    return kwargs


def _build(arch: str, arch_kwargs: Mapping[str, Any], meta: Mapping[str, Any], name: str) -> NormalizedModel:
    try:
        return build_model(arch, mean=meta["mean"], std=meta["std"], **_complete_arch_kwargs(arch_kwargs, meta))
    except UnknownModelError as e:
        raise CheckpointError(f"{name}: {e}") from e
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{name}: cannot build arch {arch!r} with {dict(arch_kwargs)}: {e}") from e


def _model_from(raw: dict, name: str, map_location) -> NormalizedModel:
    model = _build(raw["arch"], raw["arch_kwargs"], raw["meta"], name)
    check_state_dict(model, raw["state_dict"], f"{name} (arch {raw['arch']!r})")
    model.load_state_dict(raw["state_dict"], strict=True)
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model.eval()


# --------------------------------------------------------------------------- public API
def save_checkpoint(path: str | os.PathLike, model: NormalizedModel, meta: Mapping[str, Any]) -> Path:
    """Write ``model`` (built by :func:`build_model`) and ``meta`` atomically to ``path``.

    ``meta`` must hold :data:`REQUIRED_META`; ``created`` (ISO time, UTC) is added if absent.
    Values must be plain (str/int/float/bool/None/list/dict/tensor; numpy values and paths
    are converted). Raises :class:`CheckpointError` otherwise, and for NaN/inf weights
    (nothing is written then).
    """
    if not isinstance(model, NormalizedModel) or not model.arch:
        raise CheckpointError("save_checkpoint needs a NormalizedModel made by build_model (it records arch)")
    meta = _plain(dict(meta), "meta")
    meta.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    _validate_meta(meta, str(path))
    n_out = model.arch_kwargs.get("num_classes")
    if n_out is not None and n_out != len(meta["classes"]):
        raise CheckpointError(f"{path}: the model has {n_out} outputs but meta lists {len(meta['classes'])} classes")
    for key in ("mean", "std"):
        buf = getattr(model, key).detach().cpu().flatten()
        stated = torch.as_tensor(meta[key], dtype=torch.float32).flatten()
        if stated.numel() not in (1, buf.numel()) or not torch.allclose(stated.expand_as(buf), buf, atol=1e-6):
            raise CheckpointError(
                f"{path}: meta {key} {meta[key]} differs from the model's normalisation {buf.tolist()}"
            )
    state_dict = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # load would refuse it: never write it
        raise CheckpointError(
            f"refusing to save {path}: tensor {bad[0]!r} holds NaN/inf ({len(bad)} tensor(s) affected); the model "
            "diverged: lower the learning rate or restore a good checkpoint (nothing was written)"
        )
    payload = {
        "format": CHECKPOINT_FORMAT,
        "arch": model.arch,
        "arch_kwargs": _plain(model.arch_kwargs, "arch_kwargs"),
        "state_dict": state_dict,
        "meta": meta,
    }
    return torch_save(path, payload)


def read_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load and validate the raw checkpoint dict (no model is built)."""
    return _read(path, str(path), map_location)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> tuple[NormalizedModel, dict]:
    """Rebuild the :class:`NormalizedModel` (in eval mode) and return it with its meta."""
    raw = _read(path, str(path), map_location)
    return _model_from(raw, str(path), map_location), raw["meta"]


def _strip_prefixes(state_dict: Mapping[str, Any]) -> dict:
    sd = dict(state_dict)
    for prefix in _PREFIXES:
        keys = [k for k in sd if k not in ("mean", "std")]
        if keys and all(k.startswith(prefix) for k in keys):
            sd = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}
    return sd


def import_state_dict(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    arch: str,
    arch_kwargs: Mapping[str, Any],
    meta: Mapping[str, Any],
) -> Path:
    """Turn a plain ``state_dict`` file from elsewhere into a dfkd checkpoint at ``dst``.

    ``src`` is read with ``weights_only=True``; a ``{"state_dict": ...}`` or ``{"model": ...}``
    wrapper is unwrapped, and keys may carry a ``module.`` (DataParallel) and/or ``net.``
    prefix. The network is built from ``arch`` and ``arch_kwargs`` (``num_classes``,
    ``in_channels`` and ``image_size`` default to ``len(meta["classes"])`` and
    ``meta["image_shape"]``) and loaded strictly; the normalisation comes from
    ``meta["mean"]``/``meta["std"]``. Returns ``dst``.
    """
    _validate_meta(meta, "import meta")
    obj = _torch_load(src, str(src), "cpu")
    if isinstance(obj, Mapping) and obj.get("format") in KNOWN_FORMATS:
        raise CheckpointError(f"{src} is already a dfkd checkpoint")
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{src}: not a state dict (a dict of tensors)")
    sd = _strip_prefixes(obj)
    sd.pop("mean", None)
    sd.pop("std", None)
    _check_finite(sd, str(src))
    model = _build(arch, arch_kwargs, meta, str(src))
    check_state_dict(model.net, sd, f"{src} (arch {arch!r})")
    model.net.load_state_dict(sd, strict=True)
    return save_checkpoint(dst, model, meta)

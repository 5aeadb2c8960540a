"""The registry of forms of knowledge and the base class every loss shares.

A *form of knowledge* is what a student is asked to reproduce of its teacher: relations
between the samples of a batch (RKD, SP, PKT, CC), statistics of intermediate feature maps
(FSP, NST, FT, VID), a contrastive bound on mutual information (CRD), decoupled logits (DKD),
or hidden states matched across networks of different depth (PKD, CKD, ALP-KD, RAIL-KD).

Conventions shared by every loss (an ``nn.Module`` registered by name in :data:`KNOWLEDGE`):

- ``forward(student_feats, teacher_feats, **kw)`` takes two lists of tensors (or one tensor
  each), in the order of the layer pairs; feature losses sum their per-pair terms. Logit
  losses take ``forward(student_logits, teacher_logits, **kw)``.
- The class attribute ``needs`` says what an engine must tap: ``"features"`` or ``"logits"``;
  ``layers`` says which features (:data:`LAYER_KINDS`); ``suggested_weight`` is the weight
  the method was published with (``None`` where no single value is documented).
- Teacher features are *not* detached: a frozen teacher gets no gradient anyway, and a
  generator step may differentiate through them into the synthetic images.
- Trainable parts (embedding heads, regressors, adapters) are ordinary sub-modules. Each
  loss says whether they are built from shapes given at construction or lazily, from the
  first batch; :meth:`Knowledge.extra_parameters` returns them for the student's optimizer
  and refuses to answer while lazy parts are still unbuilt (an optimizer made then would
  silently miss them).
- Device-agnostic, computed in float32 (autocast is switched off inside ``forward``), no
  host synchronisation in ``forward``.
"""
from __future__ import annotations

import functools
from typing import Callable, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from teachers.registry import Registry, name_class

__all__ = [
    "KNOWLEDGE",
    "LAYER_KINDS",
    "Knowledge",
    "KnowledgeNotBuiltError",
    "UnknownKnowledgeError",
    "create_knowledge",
    "full_precision",
    "knowledge_class",
    "list_knowledge",
    "register_knowledge",
]

#: What ``Knowledge.layers`` may say about the features a loss wants.
LAYER_KINDS = {
    "embedding": "one vector per sample and network (penultimate features; maps are flattened); "
                 "several pairs are summed",
    "paired": "matched (student, teacher) feature maps, one pair per list entry, summed",
    "sequence": "the ordered stage boundaries of each network (at least two); terms between "
                "consecutive entries",
    "all": "every hidden layer of each network, in order (student layers 1..M, teacher 1..N); "
           "the loss chooses the pairs with its layer mapping",
}


class UnknownKnowledgeError(ValueError):
    """An unknown form-of-knowledge name, or options it does not accept."""


class KnowledgeNotBuiltError(RuntimeError):
    """Trainable parts that are built from the first batch were asked for before it."""


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


#: Every form of knowledge by name (``@register_knowledge("rkd")``); names ignore case and
#: treat ``-`` as ``_`` (``"ALP-KD"`` is ``"alp_kd"``).
KNOWLEDGE: Registry[type["Knowledge"]] = Registry("form of knowledge", UnknownKnowledgeError, key=_key,
                                                  on_register=name_class, plural="forms of knowledge")


def register_knowledge(name: str) -> Callable[[type], type]:
    """Class decorator: make a :class:`Knowledge` subclass available under ``name``."""
    return KNOWLEDGE.register(name)


def list_knowledge() -> list[str]:
    return KNOWLEDGE.names()


def knowledge_class(name: str) -> type["Knowledge"]:
    return KNOWLEDGE.get(name)


def create_knowledge(name: str, **options) -> "Knowledge":
    """Build the loss registered as ``name`` with its options (``create_knowledge("dkd", beta=4)``)."""
    cls = knowledge_class(name)
    try:
        return cls(**options)
    except TypeError as exc:
        raise UnknownKnowledgeError(f"{name!r}: bad options {sorted(options)}: {exc}") from None


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def full_precision(forward: Callable) -> Callable:
    """Run ``forward`` with autocast switched off on its inputs' device: under bf16 mixed
    precision a loss still computes in float32 (Gram matrices, ``exp(x / 0.07)``, small KL
    values lose too much in bf16). :class:`Knowledge` applies it to every subclass's forward."""

    @functools.wraps(forward)
    def run(self, *args, **kw):
        x = _first_tensor(args)
        if x is not None and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return forward(self, *args, **kw)
        return forward(self, *args, **kw)

    return run


class Knowledge(nn.Module):
    """Base class of every form of knowledge (see the module docstring for the contract).

    A subclass's ``forward`` runs in float32 even under autocast (:func:`full_precision`)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__:
            cls.forward = full_precision(cls.__dict__["forward"])

    name: ClassVar[str] = "base"
    needs: ClassVar[str] = "features"
    layers: ClassVar[str | None] = "paired"
    suggested_weight: ClassVar[float | None] = None

    def __init__(self):
        super().__init__()
        self._pending = False  # True while trainable parts wait for the first batch's shapes

    def extra_parameters(self) -> list[nn.Parameter]:
        """The loss's own trainable parameters, to optimise together with the student."""
        if self._pending:
            raise KnowledgeNotBuiltError(
                f"{self.name}: its trainable parts are built from the first batch's shapes; run one "
                "forward pass (or give the shapes to create_knowledge) before making the optimizer")
        return [p for p in self.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- helpers
def as_list(feats) -> list[torch.Tensor]:
    """One tensor or a sequence of tensors as a list."""
    if isinstance(feats, torch.Tensor):
        return [feats]
    return list(feats)


def pairs(name: str, student_feats, teacher_feats) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zip the two feature lists, refusing lists of different lengths or empty ones."""
    s, t = as_list(student_feats), as_list(teacher_feats)
    if len(s) != len(t) or not s:
        raise ValueError(f"{name}: needs as many student as teacher features (one or more), got {len(s)} and {len(t)}")
    for a, b in zip(s, t):
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"{name}: student and teacher batch sizes differ ({a.shape[0]} vs {b.shape[0]})")
    return list(zip(s, t))


def flat(x: torch.Tensor) -> torch.Tensor:
    """``(B, ...) -> (B, D)`` in float32."""
    return x.float().reshape(x.shape[0], -1)


def match_spatial(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive average pooling of the larger of two ``(B, C, H, W)`` maps to the smaller size
    (RepDistiller's convention for pairs of different resolution)."""
    if s.dim() != 4 or t.dim() != 4 or s.shape[-2:] == t.shape[-2:]:
        return s, t
    size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
    if s.shape[-2:] != size:
        s = F.adaptive_avg_pool2d(s, size)
    if t.shape[-2:] != size:
        t = F.adaptive_avg_pool2d(t, size)
    return s, t


def as_map(x: torch.Tensor) -> torch.Tensor:
    """A ``(B, C)`` vector as a ``(B, C, 1, 1)`` map; maps pass unchanged."""
    return x[:, :, None, None] if x.dim() == 2 else x


def channels(feats: Sequence[torch.Tensor]) -> list[int]:
    return [int(f.shape[1]) for f in feats]

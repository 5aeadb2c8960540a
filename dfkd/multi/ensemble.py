"""Several teachers that look like one: :class:`TeacherEnsemble`.

A teacher zoo may mix architectures, input normalisations and class sets. The ensemble

- keeps every member as it is (a frozen :class:`teachers.NormalizedModel`, which applies its
  own mean/std to the ``[0,1]`` images it receives);
- maps each member's classes (``meta["classes"]``, original class ids of its data set) into
  the sorted **union label space** ``self.classes``; ``index(i)[j]`` is the union position of
  member ``i``'s output ``j`` and ``mask[i, k]`` says whether member ``i`` knows union class ``k``;
- merges the members' logits with a combiner of :mod:`dfkd.multi.combine` (``forward``) and exposes
  per-member logits and penultimate features (``forward_all``).

It is accepted wherever one teacher is: ``forward(x)`` returns merged logits over the union; ``mean``/``std``
are the **first member's** (synthesizers that shape their images with a teacher's statistics use them);
``head_path`` names an ``nn.Identity`` through which the concatenation of every member's penultimate features
passes, so :func:`dfkd.core.taps.penultimate_tap` (DAFL, the embedding plots) sees all members; ``block_paths``
is empty (ZSKT's attention term is skipped: members' blocks do not pair with one student); every member's
BatchNorm layers are reached by ``modules()`` (DeepInversion matches all of them); ``train()`` leaves members
in eval mode. The ensemble has no ``net`` attribute on purpose: module paths are resolved on the ensemble itself.

Members from different data sets, or with different image shapes, are an error unless the
user says how to merge them:

- ``class_map={member_name: [union ids]}`` gives the union ids of a member's outputs (in its
  output order); members not listed use their ``meta["classes"]``. Two members that list
  the same union id share that class.
- ``allow_mixed=True`` treats classes of different data sets as distinct: union ids are
  assigned in member order (``0..K-1``, classes of members of the same data set are shared
  by their original id), class names become ``"dataset:name"``, the union ``dataset`` is
  ``"a+b"`` (not loadable: evaluate with an explicit data set or not at all). Members whose
  image shape differs from the first member's receive the input resized (bilinear) and with
  channels converted (grey -> RGB by repetition, RGB -> grey by the channel mean).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.core.taps import FeatureTap, head_path
from dfkd.multi.batched import StackedMembers, hooks_active, stack_groups
from dfkd.multi.combine import Combiner, create_combiner, resolve_combine
from dfkd.multi.labels import EnsembleError, union_label_space
from dfkd.multi.placement import place
from teachers import NormalizedModel, freeze, load_checkpoint, load_zoo

__all__ = ["EnsembleError", "EnsembleOutput", "TeacherEnsemble", "adapt_input"]


@dataclass
class EnsembleOutput:
    """What :meth:`TeacherEnsemble.forward_all` returns.

    Attributes:
        names: member names, in order.
        logits: per member, its logits over its *own* classes, ``(B, k_t)`` (float).
        union_logits: ``(T, B, K)`` the same logits placed in the union space (0 where a
            member does not know a class; see ``mask``).
        mask: ``(T, K)`` bool, ``mask[t, k]``: member ``t`` knows union class ``k``.
        merged: ``(B, K)`` the combiner's merged **logits** (softmax gives the merged
            distribution; combiners that average probabilities return log-probabilities).
        features: ``{name: (B, F_t)}`` each member's penultimate features (the flattened
            input of its classifier head).
    """

    names: list[str]
    logits: list[torch.Tensor]
    union_logits: torch.Tensor
    mask: torch.Tensor
    merged: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)


def adapt_input(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``x`` (``B, C, H, W``) converted to ``shape = (C', H', W')``: channels 1 -> 3 by
    repetition, 3 -> 1 by the mean, size by bilinear interpolation."""
    c, h, w = (int(v) for v in shape)
    if x.shape[1] != c:
        if x.shape[1] == 1:
            x = x.expand(-1, c, -1, -1)
        elif c == 1:
            x = x.mean(dim=1, keepdim=True)
        else:
            raise EnsembleError(f"cannot convert {x.shape[1]}-channel images to {c} channels")
    if tuple(x.shape[-2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x


def _last_linear(net: nn.Module) -> str | None:
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


def _head_path(model: NormalizedModel, meta: Mapping, given: str | None, name: str) -> str:
    if given:
        return given
    if meta.get("head_path"):
        return str(meta["head_path"])
    head = head_path(model)
    if head:
        return head
    head = _last_linear(model.net)
    if head is None:
        raise EnsembleError(f"member {name!r}: no head_path and no nn.Linear to use as the classifier head; "
                            "pass head_paths={name: 'module.path'}")
    return head


class TeacherEnsemble(nn.Module):
    """Frozen teachers behind one teacher interface (see the module docstring).

    Args:
        members: a sequence of ``(name, model, meta)`` tuples (what
            :func:`teachers.load_zoo` returns) and/or checkpoint paths (named by file stem).
            ``meta`` needs ``classes`` and ``image_shape``; ``class_names`` and ``dataset``
            are used when present. A model that is not a ``NormalizedModel`` is wrapped in
            one with ``meta["mean"]``/``meta["std"]``.
        combine: name of the combiner for ``forward`` (:func:`dfkd.multi.combine.list_combiners`)
            or a :class:`~dfkd.multi.combine.Combiner`; ``combine_options`` are its options.
            ``"auto"`` chooses from the class sets (:func:`dfkd.multi.combine.resolve_combine`;
            the choice is ``combiner.name``, the reason ``combine_reason``).
        class_map: ``{member_name: [union ids]}`` (see the module docstring).
        classes: optional explicit union label space (ids); a member class outside it is an
            error naming the member. Default: the sorted union of the members' classes.
        allow_mixed: merge members of different data sets / image shapes (module docstring).
        head_paths: ``{member_name: path}`` of classifier heads inside ``model.net`` for
            members whose network does not declare ``head_path`` (default: its last
            ``nn.Linear``).
    """

    head_path = "penultimate"
    block_paths: tuple[str, ...] = ()
    #: members of one architecture in one pass where no hook watches them (:mod:`dfkd.multi.batched`):
    #: True, False, or None (on CUDA only: on CPU one stacked pass measured slower than separate ones)
    batch_members: bool | None = None

    def __init__(
        self,
        members: Sequence[Any],
        combine: str | Combiner = "mean_prob",
        combine_options: Mapping[str, Any] | None = None,
        class_map: Mapping[str, Sequence[int]] | None = None,
        classes: Sequence[int] | None = None,
        allow_mixed: bool = False,
        head_paths: Mapping[str, str] | None = None,
    ):
        super().__init__()
        entries = [self._entry(m) for m in members]
        if not entries:
            raise EnsembleError("an ensemble needs at least one member")
        names = [e[0] for e in entries]
        if len(set(names)) != len(names):
            raise EnsembleError(f"duplicate member names: {names}")
        class_map = dict(class_map or {})
        unknown = sorted(set(class_map) - set(names))
        if unknown:
            raise EnsembleError(f"class_map names unknown members {unknown}; members: {', '.join(names)}")
        if class_map and allow_mixed:
            raise EnsembleError("give either class_map or allow_mixed, not both")
        self.names: list[str] = names
        self.metas: list[dict] = [dict(e[2]) for e in entries]
        self.allow_mixed = bool(allow_mixed)
        self.members = nn.ModuleList(freeze(e[1]) for e in entries)
        heads = dict(head_paths or {})
        self.member_heads = [_head_path(m, meta, heads.get(n), n) for n, m, meta in entries]
        self._check_compatible(bool(class_map))
        self.member_keys, keys, union, class_names = union_label_space(self.names, self.metas, self.allow_mixed,
                                                                       class_map, classes)
        self.classes: list[int] = union
        self.class_names: list[str] = class_names
        self.num_classes = len(union)
        position = {k: i for i, k in enumerate(keys)}
        mask = torch.zeros(len(entries), self.num_classes, dtype=torch.bool)
        for i, member_keys in enumerate(self.member_keys):
            idx = torch.tensor([position[k] for k in member_keys], dtype=torch.long)
            self.register_buffer(f"_index_{i}", idx, persistent=False)
            mask[i, idx] = True
        self.register_buffer("mask", mask, persistent=False)
        self.combine_reason = None
        if combine == "auto":  # chosen from the class sets (dfkd.multi.combine.resolve_combine)
            combine, self.combine_reason = resolve_combine(mask, names)
        self.combiner = combine if isinstance(combine, Combiner) else create_combiner(combine, **dict(combine_options or {}))
        try:
            self.combiner.check_mask(mask, names)
        except ValueError as exc:
            raise EnsembleError(f"members {names}: {exc}") from None
        self.combiner.eval()
        self.penultimate = nn.Identity()
        self.member_devices: list[torch.device] | None = None  # place_members
        self._groups: list | None = None  # (member indices, StackedMembers or None), built at the first pass

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_zoo(cls, path: str | os.PathLike, map_location="cpu", **kwargs) -> "TeacherEnsemble":
        """Verify a zoo manifest (:func:`teachers.load_zoo`) and build the ensemble of its teachers."""
        ensemble = cls(load_zoo(path, map_location=map_location), **kwargs)
        ensemble.zoo_path = str(path)
        return ensemble

    @staticmethod
    def _entry(item) -> tuple[str, NormalizedModel, dict]:
        if isinstance(item, (str, os.PathLike)):
            model, meta = load_checkpoint(item)
            return Path(item).stem, model, meta
        try:
            name, model, meta = item
        except (TypeError, ValueError):
            raise EnsembleError(f"a member must be (name, model, meta) or a checkpoint path, got {item!r}") from None
        name = str(name)
        meta = dict(meta or {})
        for key in ("classes", "image_shape"):
            if key not in meta:
                raise EnsembleError(f"member {name!r}: meta lacks {key!r}")
        if not isinstance(model, NormalizedModel):
            if "mean" not in meta or "std" not in meta:
                raise EnsembleError(f"member {name!r} is not a NormalizedModel and its meta has no mean/std")
            model = NormalizedModel(model, meta["mean"], meta["std"])
        n_out = (getattr(model, "arch_kwargs", None) or {}).get("num_classes")
        if n_out is not None and int(n_out) != len(meta["classes"]):
            raise EnsembleError(f"member {name!r}: the model has {n_out} outputs but meta lists "
                                f"{len(meta['classes'])} classes")
        return name, model, meta

    def _check_compatible(self, mapped: bool) -> None:
        datasets = [m.get("dataset") for m in self.metas]
        shapes = [tuple(int(v) for v in m["image_shape"]) for m in self.metas]
        if len(set(datasets)) > 1 and not (mapped or self.allow_mixed):
            listing = ", ".join(f"{n} ({d})" for n, d in zip(self.names, datasets))
            raise EnsembleError(f"members come from different data sets: {listing}; give class_map="
                                "{member: [union ids]} to say which classes are shared, or allow_mixed=True "
                                "to keep them apart")
        if len(set(shapes)) > 1 and not self.allow_mixed:
            listing = ", ".join(f"{n} {list(s)}" for n, s in zip(self.names, shapes))
            raise EnsembleError(f"members read different image shapes: {listing}; pass allow_mixed=True to "
                                f"resize the input for each member (the ensemble reads {list(shapes[0])})")
        self.image_shape = shapes[0]
        self.member_shapes = shapes

    # -- label space --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.members)

    def index(self, i: int) -> torch.Tensor:
        """Union positions of member ``i``'s outputs (``LongTensor`` of length ``k_i``)."""
        return getattr(self, f"_index_{i}")

    @property
    def class_indices(self) -> list[torch.Tensor]:
        return [self.index(i) for i in range(len(self))]

    def place_members(self, devices) -> None:
        """Keep member ``i`` on ``devices[i % len(devices)]`` (``None``: with the ensemble), bridged
        so that callers' tensors stay on their device (:mod:`dfkd.multi.placement`)."""
        self.member_devices = [torch.device(d) for d in devices] if devices else None
        self._bridges = place(self.members, self.member_devices or [], getattr(self, "_bridges", None))
        self._groups = None

    def placed_devices(self) -> list[torch.device]:
        """Each member's device."""
        return [next(iter(m.buffers()), torch.empty(0)).device for m in self.members]

    def _apply(self, fn, *args, **kwargs):
        """``.to()``, ``.float()`` ...; placed members go back to their own devices."""
        result = super()._apply(fn, *args, **kwargs)
        self._groups = None
        devices = getattr(self, "member_devices", None)
        for i, member in enumerate(self.members if devices else ()):
            member.to(devices[i % len(devices)])
        return result

    def member(self, name: str) -> NormalizedModel:
        return self.members[self.names.index(name)]

    def place(self, logits: torch.Tensor, i: int) -> torch.Tensor:
        """Member ``i``'s logits ``(B, k_i)`` in the union space ``(B, K)`` (0 elsewhere)."""
        out = logits.new_zeros(logits.shape[0], self.num_classes)
        return out.index_copy(1, self.index(i), logits)

    @property
    def mean(self) -> torch.Tensor:
        """The first member's input mean ``(1, C, 1, 1)``."""
        return self.members[0].mean

    @property
    def std(self) -> torch.Tensor:
        """The first member's input std ``(1, C, 1, 1)``."""
        return self.members[0].std

    def meta(self) -> dict:
        """Checkpoint-style metadata of the union (what ``run_distillation`` reads).

        ``dataset`` is the members' common data set (``"a+b"`` when mixed); ``mean``,
        ``std``, ``image_shape`` are the first member's; ``test_accuracy`` is None (the
        ensemble's accuracy is measured by whoever has test data); ``members`` lists each
        member's name, arch, data set, classes, union positions and reported accuracy.
        """
        datasets = []
        for m in self.metas:
            if m.get("dataset") not in datasets:
                datasets.append(m.get("dataset"))
        first = self.metas[0]
        mean = first.get("mean", self.mean.flatten().tolist())
        std = first.get("std", self.std.flatten().tolist())
        return {
            "dataset": datasets[0] if len(datasets) == 1 else "+".join(str(d) for d in datasets),
            "classes": list(self.classes),
            "class_names": list(self.class_names),
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
            "image_shape": list(self.image_shape),
            "test_accuracy": None,
            "seed": None,
            "combine": self.combiner.name,
            "members": [
                {"name": n, "arch": getattr(model, "arch", None), "dataset": m.get("dataset"),
                 "classes": list(m["classes"]), "union_index": self.index(i).tolist(),
                 "test_accuracy": m.get("test_accuracy")}
                for i, (n, model, m) in enumerate(zip(self.names, self.members, self.metas))
            ],
        }

    # -- forward ------------------------------------------------------------------------------
    def _member_forward(self, i: int, x: torch.Tensor, tap: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        member, head = self.members[i], self.member_heads[i]
        if self.member_shapes[i] != tuple(x.shape[1:]):
            x = adapt_input(x, self.member_shapes[i])
        with FeatureTap(member, [head] if tap else [], capture="input") as taps:
            logits = member(x)
            features = taps[head].flatten(1).float().to(x.device) if tap else None
        if logits.dim() != 2 or logits.shape[1] != self.index(i).numel():
            raise EnsembleError(f"member {self.names[i]!r} returned logits of shape {tuple(logits.shape)} but its "
                                f"meta lists {self.index(i).numel()} classes")
        return logits.float(), features

    def _member_groups(self) -> list:
        if self._groups is None:
            groups = stack_groups(self.members, self.member_shapes, self.member_heads)
            self._groups = [(g, StackedMembers([self.members[i] for i in g], self.member_heads[g[0]]) if len(g) > 1 else None)
                            for g in groups]
        return self._groups

    def _batched(self, group: list[int]) -> bool:
        if self.batch_members is None:
            return self.placed_devices()[group[0]].type == "cuda"
        return bool(self.batch_members)

    def _group_forward(self, group: list[int], stacked: StackedMembers, x: torch.Tensor):
        """Members ``group`` (one architecture) in one pass: their logits and features, on ``x``'s device."""
        first = group[0]
        x_in = adapt_input(x, self.member_shapes[first]) if self.member_shapes[first] != tuple(x.shape[1:]) else x
        logits, features = stacked(x_in.to(self.placed_devices()[first]))
        for i, z in zip(group, logits):
            if z.dim() != 2 or z.shape[1] != self.index(i).numel():
                raise EnsembleError(f"member {self.names[i]!r} returned logits of shape {tuple(z.shape)} but its "
                                    f"meta lists {self.index(i).numel()} classes")
        return logits.float().to(x.device), features.float().to(x.device)

    def member_logits(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Member ``i``'s logits over its own classes ``(B, k_i)`` (float); no features tapped."""
        return self._member_forward(i, x, tap=False)[0]

    def forward_all(self, x: torch.Tensor, combiner: Combiner | None = None) -> EnsembleOutput:
        """Every member's logits and features, and the merged logits (``combiner`` or the
        ensemble's own)."""
        logits, feats = [None] * len(self), [None] * len(self)
        for group, stacked in self._member_groups():
            if stacked is not None and self._batched(group) and not any(hooks_active(self.members[i]) for i in group):
                z, f = self._group_forward(group, stacked, x)
                for j, i in enumerate(group):
                    logits[i], feats[i] = z[j], f[j]
                continue
            for i in group:
                logits[i], feats[i] = self._member_forward(i, x)
        features = dict(zip(self.names, feats))
        self.penultimate(torch.cat(list(features.values()), dim=1))
        union = torch.stack([self.place(z, i) for i, z in enumerate(logits)])
        merged = (combiner or self.combiner)(union, self.mask)
        return EnsembleOutput(list(self.names), logits, union, self.mask, merged, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Merged logits over the union label space ``(B, K)``."""
        return self.forward_all(x).merged

    def train(self, mode: bool = True) -> "TeacherEnsemble":
        """Sets the ensemble's own mode; frozen members and the ensemble's combiner stay in
        eval mode (the merged output is deterministic)."""
        super().train(mode)
        self.combiner.eval()
        return self

    def extra_repr(self) -> str:
        return f"members={self.names}, classes={self.num_classes}, combine={self.combiner.name!r}"

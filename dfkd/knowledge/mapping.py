"""Layer mapping between a deep teacher (layers 1..N) and a shallow student (layers 1..M).

Layer numbers are **1-based**, as in the papers: layer ``k`` is the output of the k-th
block (transformer layer, residual stage), so with a HuggingFace-style ``hidden_states``
tuple (entry 0 = embeddings) ``hidden_states[k]`` is layer ``k``. The losses below take the
lists of all student layers ``[h_S^1 .. h_S^M]`` and all teacher layers ``[h_T^1 .. h_T^N]``
(``layers = "all"``; entry ``k - 1`` is layer ``k``), one ``(B, D)`` vector per sample and
layer (e.g. the ``[CLS]`` vector, or pooled features; larger tensors are flattened).

Student layers whose width differs from the teacher layer(s) they learn from get a linear
adapter ``D_S -> D_T`` (an extension: the papers distil between equal widths), built from
``student_dims``/``teacher_dims`` when given, else from the first batch. ALP-KD and RAIL-KD
compare a student layer with teacher layers of one width; for a teacher whose layers differ
(a CNN's blocks), ``teacher_width=D`` maps every teacher layer of another width through its
own linear projection ``D_T^k -> D`` first. RAIL-KD's layer-wise variant projects both sides
with trainable maps, and so does :class:`RAILKD` (its loss compares unit vectors, so shrinking
both sides gains nothing). For ALP-KD, an extension, the projections are fixed random maps
(``N(0, 1/D)`` entries, no bias): its plain MSE would otherwise be lowered by shrinking the
trainable projection and the student's features together to zero, which killed the student
(10% after 200 steps on Fashion-MNIST, docs/experiments.md).
"""
from __future__ import annotations

from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.knowledge.registry import Knowledge, as_list, flat, register_knowledge

__all__ = ["pkd_layers", "ckd_groups", "alp_kd_weights", "rail_kd_layers", "PKD", "CKD", "ALPKD", "RAILKD",
           "patient_loss"]


def _check_depths(teacher_layers: int, student_layers: int) -> None:
    if not (isinstance(teacher_layers, int) and isinstance(student_layers, int)) or not 1 <= student_layers <= teacher_layers:
        raise ValueError(f"need 1 <= student_layers <= teacher_layers, got {student_layers} and {teacher_layers}")


def pkd_layers(teacher_layers: int, student_layers: int, strategy: str = "skip", include_last: bool = False) -> list[int]:
    """PKD's mapping (Sun, Cheng, Gan & Liu, EMNLP 2019, arXiv:1908.09355): the teacher layer
    for each student layer ``j = 1 .. M-1``.

    ``"skip"``: every ``N/M``-th layer, ``floor(j N / M)`` (12 -> 6: ``[2, 4, 6, 8, 10]``);
    ``"last"``: the last ``M - 1`` layers below the top, ``N - M + j`` (12 -> 6:
    ``[7, 8, 9, 10, 11]``). The paper leaves the top layers out (their output is what the KD
    loss on the predictions already transfers); ``include_last=True`` adds the pair
    ``(M, N)`` (12 -> 6 skip: ``[2, 4, 6, 8, 10, 12]``)."""
    _check_depths(teacher_layers, student_layers)
    n, m = teacher_layers, student_layers
    if strategy == "skip":
        out = [j * n // m for j in range(1, m)]
    elif strategy == "last":
        out = [n - m + j for j in range(1, m)]
    else:
        raise ValueError(f"pkd: strategy must be 'skip' or 'last', not {strategy!r}")
    return out + [n] if include_last else out


def ckd_groups(teacher_layers: int, student_layers: int, strategy: str = "regular") -> list[list[int]]:
    """CKD's combinations (Wu, Passban, Rezagholizadeh & Liu, EMNLP 2020, arXiv:2010.03034):
    the group of teacher layers each student layer ``j = 1 .. M`` learns from.

    ``"regular"``: consecutive, disjoint groups covering every teacher layer,
    ``floor((j-1) N / M) + 1 .. floor(j N / M)`` (12 -> 4: ``[[1,2,3], [4,5,6], [7,8,9],
    [10,11,12]]``); ``"cross"``: interleaved, ``{j, j + M, j + 2M, ...}`` (12 -> 4:
    ``[[1,5,9], [2,6,10], [3,7,11], [4,8,12]]``). Other combinations (overlapping or
    skipping groups) are given to :class:`CKD` explicitly as ``groups``."""
    _check_depths(teacher_layers, student_layers)
    n, m = teacher_layers, student_layers
    if strategy == "regular":
        return [list(range((j - 1) * n // m + 1, j * n // m + 1)) for j in range(1, m + 1)]
    if strategy == "cross":
        return [list(range(j, n + 1, m)) for j in range(1, m + 1)]
    raise ValueError(f"ckd: strategy must be 'regular' or 'cross', not {strategy!r}")


def alp_kd_weights(student: torch.Tensor, teachers: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """ALP-KD's attention (Passban, Wu, Rezagholizadeh & Liu, AAAI 2021, arXiv:2012.14022) of one
    student layer over all teacher layers, per sample:
    ``alpha_k = softmax_k(<h_S, h_T^k> / temperature)``; ``student`` ``(B, D)``, ``teachers``
    ``(B, N, D)``; returns ``(B, N)``. The paper uses the plain dot product (``temperature =
    1``); some reimplementations divide by ``sqrt(D)``."""
    return F.softmax(torch.bmm(teachers, student[:, :, None])[..., 0] / temperature, dim=1)


def rail_kd_layers(teacher_layers: int, student_layers: int, generator: torch.Generator | None = None,
                   include_last: bool = False) -> list[int]:
    """RAIL-KD's mapping (Haidar, Anchuri, Rezagholizadeh, Ghaddar, Langlais & Poupart, 2022,
    arXiv:2109.10164): ``M - 1`` distinct teacher layers drawn uniformly from ``1 .. N-1``,
    sorted so that depth order is kept, one per student layer ``1 .. M-1`` (PKD's convention
    for the top layers; ``include_last=True`` adds the fixed pair ``(M, N)``). A new draw
    per call, so the caller sets the schedule (every step, or once per epoch). The same
    seeded ``generator`` gives the same sequence of draws."""
    _check_depths(teacher_layers, student_layers)
    pool = torch.randperm(teacher_layers - 1, generator=generator)[: student_layers - 1] + 1
    out = sorted(pool.tolist())
    return out + [teacher_layers] if include_last else out


def patient_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """PKD's patient term for one pair: ``|| h_S / ||h_S||_2 - h_T / ||h_T||_2 ||_2^2``, averaged
    over the batch."""
    return (F.normalize(student, dim=1) - F.normalize(teacher, dim=1)).pow(2).sum(dim=1).mean()


def _dims(value, count: int, what: str) -> list[int] | None:
    if value is None:
        return None
    dims = [int(value)] * count if isinstance(value, int) else [int(v) for v in value]
    if len(dims) != count:
        raise ValueError(f"{what}: expected {count} widths, got {len(dims)}")
    return dims


class _LayerMapping(Knowledge):
    """Shared parts: depth checks, flattening and the lazily built student adapters."""

    layers = "all"
    #: ``teacher_width``'s projections learn with the student (True) or are fixed random maps
    learned_teacher_projections: ClassVar[bool] = True

    def __init__(self, teacher_layers: int, student_layers: int, student_dims=None, teacher_dims=None,
                 teacher_width: int | None = None):
        super().__init__()
        _check_depths(teacher_layers, student_layers)
        if teacher_width is not None and (not isinstance(teacher_width, int) or teacher_width < 1):
            raise ValueError(f"{self.name}: teacher_width must be a positive integer, got {teacher_width!r}")
        self.teacher_layers, self.student_layers = teacher_layers, student_layers
        self.teacher_width = teacher_width
        self.adapters = nn.ModuleDict()
        self.teacher_projections = nn.ModuleDict()  # teacher layer k -> Linear(D_T^k, teacher_width)
        ds, dt = _dims(student_dims, student_layers, "student_dims"), _dims(teacher_dims, teacher_layers, "teacher_dims")
        if ds is not None and dt is not None:
            self._build(ds, dt)
        else:
            self._pending = True

    def _targets(self) -> dict[int, list[int]]:
        """Student layer -> the teacher layers its adapter must reach (their widths must agree)."""
        raise NotImplementedError("abstract: each mapping names the teacher layers of each student layer")

    def _build(self, ds: list[int], dt: list[int], device=None) -> None:
        dt = self._project_teacher_widths(dt, device)
        for j, ks in self._targets().items():
            widths = {dt[k - 1] for k in ks}
            if len(widths) != 1:
                raise ValueError(f"{self.name}: student layer {j} learns from teacher layers {ks} of different widths {sorted(widths)}")
            (width,) = widths
            if ds[j - 1] != width:
                self.adapters[str(j)] = nn.Linear(ds[j - 1], width).to(device)
        self._pending = False

    def _inputs(self, student_feats, teacher_feats) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        s, t = [flat(x) for x in as_list(student_feats)], [flat(x) for x in as_list(teacher_feats)]
        if len(s) != self.student_layers or len(t) != self.teacher_layers:
            raise ValueError(f"{self.name}: built for {self.student_layers} student and {self.teacher_layers} teacher "
                             f"layers, got {len(s)} and {len(t)}")
        if self._pending:
            self._build([x.shape[1] for x in s], [x.shape[1] for x in t], s[0].device)
        t = [self.teacher_projections[str(k)](x) if str(k) in self.teacher_projections else x
             for k, x in enumerate(t, start=1)]
        return s, t

    def _project_teacher_widths(self, dt: list[int], device=None) -> list[int]:
        """Build the teacher projections of ``teacher_width`` (if set); the teacher widths after them."""
        if self.teacher_width is None:
            return dt
        for k, width in enumerate(dt, start=1):
            if width == self.teacher_width:
                continue
            if self.learned_teacher_projections:
                projection = nn.Linear(width, self.teacher_width)
            else:  # fixed random map, N(0, 1/D): lengths and dot products kept in expectation
                projection = nn.Linear(width, self.teacher_width, bias=False).requires_grad_(False)
                nn.init.normal_(projection.weight, std=self.teacher_width ** -0.5)
            self.teacher_projections[str(k)] = projection.to(device)
        return [self.teacher_width] * len(dt)

    def _student(self, s: list[torch.Tensor], j: int) -> torch.Tensor:
        key = str(j)
        return self.adapters[key](s[j - 1]) if key in self.adapters else s[j - 1]


@register_knowledge("pkd")
class PKD(_LayerMapping):
    """Patient knowledge distillation, Sun, Cheng, Gan & Liu, EMNLP 2019, arXiv:1908.09355.

    ``L_PT = sum_j || h_S^j / ||h_S^j||_2 - h_T^{g(j)} / ||h_T^{g(j)}||_2 ||_2^2`` (batch mean)
    over the student layers of :func:`pkd_layers` (``strategy="skip"`` or ``"last"``). The
    paper tunes its weight ``beta`` in ``{10, 100, 500, 1000}``, so none is suggested.
    Zero when each student layer equals its teacher layer up to scale.
    """

    def __init__(self, teacher_layers: int = 12, student_layers: int = 6, strategy: str = "skip",
                 include_last: bool = False, student_dims=None, teacher_dims=None):
        self.mapping = pkd_layers(teacher_layers, student_layers, strategy, include_last)
        if not self.mapping:
            raise ValueError("pkd: a one-layer student has no intermediate layer; use include_last=True")
        super().__init__(teacher_layers, student_layers, student_dims, teacher_dims)

    def _targets(self):
        return {j: [k] for j, k in enumerate(self.mapping, start=1)}

    def forward(self, student_feats, teacher_feats, **kw) -> torch.Tensor:
        s, t = self._inputs(student_feats, teacher_feats)
        return sum(patient_loss(self._student(s, j), t[k - 1]) for j, k in enumerate(self.mapping, start=1))


@register_knowledge("ckd")
class CKD(_LayerMapping):
    """Combinatorial knowledge distillation, Wu, Passban, Rezagholizadeh & Liu, EMNLP 2020
    ("Why Skip If You Can Combine"), arXiv:2010.03034.

    Student layer ``j`` learns from a combination of its group ``G_j`` of teacher layers
    (:func:`ckd_groups`, or ``groups=`` explicitly): the teacher vectors are concatenated and
    linearly projected to the student's width, ``f_j = W_j [h_T^k ; k in G_j] + b_j``, and
    ``L = sum_j MSE(h_S^j, f_j)`` (mean over batch and features). The projections are
    trainable (:meth:`extra_parameters`), built from ``student_dims``/``teacher_dims`` when
    given, else from the first batch. ``groups`` may hold fewer than ``M`` groups (student
    layers beyond them learn nothing).
    """

    def __init__(self, teacher_layers: int = 12, student_layers: int = 6, strategy: str = "regular",
                 groups: Sequence[Sequence[int]] | None = None, student_dims=None, teacher_dims=None):
        self.groups = [list(g) for g in groups] if groups is not None else ckd_groups(teacher_layers, student_layers, strategy)
        if len(self.groups) > student_layers or any(not g or min(g) < 1 or max(g) > teacher_layers for g in self.groups):
            raise ValueError(f"ckd: groups must be non-empty lists of teacher layers 1..{teacher_layers}, at most one "
                             f"per student layer, got {self.groups}")
        super().__init__(teacher_layers, student_layers, student_dims, teacher_dims)

    def _targets(self):
        return {}

    def _build(self, ds, dt, device=None):
        self.combine = nn.ModuleList(nn.Linear(sum(dt[k - 1] for k in g), ds[j]).to(device)
                                     for j, g in enumerate(self.groups))
        self._pending = False

    def forward(self, student_feats, teacher_feats, **kw) -> torch.Tensor:
        s, t = self._inputs(student_feats, teacher_feats)
        return sum(F.mse_loss(s[j], proj(torch.cat([t[k - 1] for k in g], dim=1)))
                   for j, (g, proj) in enumerate(zip(self.groups, self.combine)))


@register_knowledge("alp_kd")
class ALPKD(_LayerMapping):
    """Attention-based layer projection, Passban, Wu, Rezagholizadeh & Liu, AAAI 2021,
    arXiv:2012.14022.

    Every student layer ``j`` attends over all teacher layers (:func:`alp_kd_weights`):
    ``f_T^j = sum_k alpha_jk h_T^k`` and ``L = sum_j MSE(h_S^j, f_T^j)`` (mean over batch and
    features). The attention itself has no parameters (it is computed from the student's
    own vector, so its gradient reaches the student); only width adapters, where widths
    differ, are trainable. All teacher layers must share one width, or ``teacher_width`` projects
    them to one (module docstring).
    """

    learned_teacher_projections = False

    def __init__(self, teacher_layers: int = 12, student_layers: int = 6, temperature: float = 1.0,
                 student_dims=None, teacher_dims=None, teacher_width: int | None = None):
        self.temperature = float(temperature)
        super().__init__(teacher_layers, student_layers, student_dims, teacher_dims, teacher_width)

    def _targets(self):
        return {j: list(range(1, self.teacher_layers + 1)) for j in range(1, self.student_layers + 1)}

    def forward(self, student_feats, teacher_feats, **kw) -> torch.Tensor:
        s, t = self._inputs(student_feats, teacher_feats)
        stack = torch.stack(t, dim=1)  # (B, N, D)
        total = 0.0
        for j in range(1, self.student_layers + 1):
            hs = self._student(s, j)
            alpha = alp_kd_weights(hs, stack, self.temperature)
            total = total + F.mse_loss(hs, (alpha[:, :, None] * stack).sum(dim=1))
        return total


@register_knowledge("rail_kd")
class RAILKD(_LayerMapping):
    """Random intermediate layer KD, Haidar, Anchuri, Rezagholizadeh, Ghaddar, Langlais &
    Poupart, 2022, arXiv:2109.10164.

    Each call draws a new sorted set of teacher layers (:func:`rail_kd_layers`, from the
    ``generator`` given at construction or to ``forward``; the draw is kept in
    ``last_mapping``) and applies PKD's normalised distance to the pairs (:func:`patient_loss`,
    summed). The paper's layer-wise variant projects both sides linearly before comparing:
    ``teacher_width=D`` projects every teacher layer to width ``D`` and the student adapters
    map to ``D``; without it only a student adapter is used, where widths differ, and all
    teacher layers that can be drawn must share one width.
    """

    def __init__(self, teacher_layers: int = 12, student_layers: int = 6, include_last: bool = False,
                 generator: torch.Generator | None = None, student_dims=None, teacher_dims=None,
                 teacher_width: int | None = None):
        self.include_last, self.generator, self.last_mapping = bool(include_last), generator, None
        if student_layers < 2 and not include_last:
            raise ValueError("rail_kd: a one-layer student has no intermediate layer; use include_last=True")
        super().__init__(teacher_layers, student_layers, student_dims, teacher_dims, teacher_width)

    def _targets(self):
        out = {j: list(range(1, self.teacher_layers)) for j in range(1, self.student_layers)}
        if self.include_last:
            out[self.student_layers] = [self.teacher_layers]
        return out

    def forward(self, student_feats, teacher_feats, generator: torch.Generator | None = None, **kw) -> torch.Tensor:
        s, t = self._inputs(student_feats, teacher_feats)
        self.last_mapping = rail_kd_layers(self.teacher_layers, self.student_layers, generator or self.generator,
                                           self.include_last)
        return sum(patient_loss(self._student(s, j), t[k - 1]) for j, k in enumerate(self.last_mapping, start=1))

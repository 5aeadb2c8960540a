"""Per-member synthesis: every member of a zoo inverts itself, and each image keeps its origin.

A shared synthesizer treats the zoo as one teacher: each image must match every member's
BatchNorm statistics, though each member holds the statistics of its own classes only, and
nothing makes sure each member's classes are covered. :class:`PerMemberSynthesizer` instead
runs one synthesizer of the chosen method (``fast`` or ``deepinversion``) per member ``t``:

- its own generator (or pixels), its member's BN statistics, its one-hot / cross-entropy
  targets drawn from the member's own classes ``C_t``;
- the image budget split by class counts: member ``t`` makes ``n_t ~ N |C_t| / sum_u |C_u|``
  of the ``N`` images of a round (:func:`split_budget`), and takes the same share of every
  student batch and of the bank;
- the student as member ``t`` sees it (:class:`MemberView`): its logits of ``C_t`` plus one
  *other* logit, ``logsumexp`` of the student's remaining classes, against the member's
  logits plus an *other* logit fixed at ``OTHER_LOGIT`` (:class:`MemberTeacher`). A method's
  adversarial term (Fast's ``-1[agree] KL(p_T || p_S)``, ADI's competition) then also rewards
  images the member calls its own while the student leaks mass to another member's classes:
  cross-member hard negatives, made on purpose (``cross_member=True``);
- every image enters one bank (:class:`OriginPool`, one per member) with its origin member,
  the origin member's class (for class-balanced sampling) and, with ``cache_targets``, every
  member's logits on it: ``true``, the student steps run no teacher; ``"others"``, each
  student batch runs only each image's origin member (on the augmented view the student
  sees), the other members' evidence comes from the bank; ``false`` (default), every member
  relabels every student batch.

The student's target for an image ``x`` of origin ``o`` (:func:`member_target`) combines the
origin with the other members' *calibrated* evidence::

    zhat_t = (z_t - mu_t) / sigma_t                  running per-logit statistics of the bank
    e_t    = logsumexp_{k in C_t} zhat_t(k)          how much more than usual t claims x
    rho_t  = a if t = o else (1 - a) / (T - 1)       origin prior, a = origin_prior
    pi_t   = softmax_t(e_t + log rho_t)              which member
    q(k)   = sum_t pi_t p_t(k)                       p_t = softmax(z_t) over C_t: which class within it

and the student loss (:func:`member_losses`) is ``T^2 KL(q || p_S)`` at the method's
temperature plus, with weight ``negative_weight``, the hard-negative term on the images whose
target belongs to the origin member but which the student places among another member's
classes::

    h_i   = 1[argmax q_i in C_o] * 1[argmax p_S,i not in C_o]
    neg   = mean_i h_i * -log sum_{k in C_o} p_S(k | x_i)

With one member, ``q = p_o`` and the loss is plain KD.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dfkd.multi.calibrated import LogitCalibration
from dfkd.multi.ensemble import TeacherEnsemble, adapt_input
from dfkd.multi.member_settings import (  # noqa: F401  (part of this module's API)
    DEFAULTS,
    PER_MEMBER_METHODS,
    SYNTHESIS_MODES,
    check_per_member,
    check_settings,
    resolve_synthesis,
    split_budget,
)
from dfkd.multi.member_targets import member_losses, member_target  # noqa: F401  (part of this module's API)
from generators.base import (
    Synthesizer,
    SynthesizerOptionError,
    SyntheticBatch,
    augment_batch,
    create_synthesizer,
    mix_batch,
    synthesizer_class,
)
from generators.pool import ImagePool
from teachers.device import check_precision

__all__ = ["PER_MEMBER_METHODS", "OTHER_LOGIT", "MemberBatch", "MemberTeacher", "MemberView", "OriginPool",
           "PerMemberSynthesizer", "split_budget", "member_target", "member_losses", "check_per_member",
           "check_settings", "resolve_synthesis", "SYNTHESIS_MODES", "DEFAULTS"]

#: the member's fixed logit for "not one of mine" (probability exp(-1e4) = 0 in float32)
OTHER_LOGIT = -1e4


@dataclass
class MemberBatch(SyntheticBatch):
    """A student batch of per-member synthesis: ``origin`` ``(B,)`` is the member that made
    each image; ``union_logits`` ``(T, B, K)`` every member's logits on the (unaugmented)
    images when the bank caches them, else ``None``."""

    origin: torch.Tensor | None = None
    union_logits: torch.Tensor | None = None


class MemberTeacher(nn.Module):
    """Member ``i`` of an ensemble as one synthesizer's teacher: its logits over its own classes
    (the input adapted to its image shape), plus an ``OTHER_LOGIT`` column when ``other``.
    ``mean``/``std`` are the member's."""

    def __init__(self, ensemble: TeacherEnsemble, i: int, other: bool):
        super().__init__()
        self.member, self.shape, self.other = ensemble.members[i], tuple(ensemble.member_shapes[i]), bool(other)
        self.home = (ensemble.member_devices or [None])[i % len(ensemble.member_devices or [None])]

    def _apply(self, fn, *args, **kwargs):
        """A member placed on a device of its own (:mod:`dfkd.multi.placement`) stays there."""
        result = super()._apply(fn, *args, **kwargs)
        if self.home is not None:
            self.member.to(self.home)
        return result

    @property
    def mean(self):
        return self.member.mean

    @property
    def std(self):
        return self.member.std

    def forward(self, x):
        if tuple(x.shape[1:]) != self.shape:
            x = adapt_input(x, self.shape)
        z = self.member(x)
        if self.other:
            z = torch.cat([z, z.new_full((z.shape[0], 1), OTHER_LOGIT)], dim=1)
        return z

    def train(self, mode: bool = True):
        super().train(mode)
        self.member.eval()  # a frozen teacher stays in eval mode
        return self


class MemberView(nn.Module):
    """The student as member ``i`` sees it: its logits of the member's classes (``index``,
    member order) and, when ``other``, ``logsumexp`` of all its other logits as one more column."""

    def __init__(self, student: nn.Module, index: torch.Tensor, num_classes: int, other: bool):
        super().__init__()
        self.student, self.other = student, bool(other)
        self.register_buffer("index", index.clone(), persistent=False)
        rest = torch.ones(num_classes, dtype=torch.bool)
        rest[index] = False
        self.register_buffer("rest", rest, persistent=False)

    def forward(self, x):
        s = self.student(x)
        own = s.index_select(1, self.index.to(s.device))
        if not self.other:
            return own
        rest = torch.logsumexp(s.masked_fill(~self.rest.to(s.device), float("-inf")), dim=1, keepdim=True)
        return torch.cat([own, rest], dim=1)


class OriginPool(ImagePool):
    """The bank of one member: a FIFO :class:`~generators.pool.ImagePool` whose ``add`` (called
    by the member's synthesizer) asks ``on_add(images)`` for each image's label (the origin
    member's class, for class-balanced sampling) and, when caching, every member's logits
    ``(T, n, K)`` on it, kept beside the image."""

    def __init__(self, capacity: int, on_add):
        super().__init__(capacity)
        self.on_add = on_add
        self.logits: torch.Tensor | None = None  # (capacity, T, K) when targets are cached

    def add(self, images, labels=None):
        images = images.detach()[-self.capacity:]
        labels, logits = self.on_add(images)
        if logits is not None:
            logits = logits.transpose(0, 1)  # (n, T, K)
            if self.logits is None:
                self.logits = torch.zeros((self.capacity, *logits.shape[1:]), device=logits.device)
            self._write(self.logits, logits)
        super().add(images, labels)

    def state_dict(self):
        state = super().state_dict()
        state["logits"] = None if self.logits is None else self.logits[: self.count].cpu().clone()
        return state

    def load_state_dict(self, state, device=None):
        super().load_state_dict(state, device)
        self.logits = None
        if state.get("logits") is not None and self.count:
            held = state["logits"].to(self.images.device)
            self.logits = torch.zeros((self.capacity, *held.shape[1:]), device=held.device)
            self.logits[: self.count] = held


class PerMemberSynthesizer(Synthesizer):
    """One synthesizer of ``method`` per member of ``ensemble`` (module docstring).

    ``options`` are the method's, for the whole zoo: ``synthesis_batch_size``, ``batch_size``
    and ``pool_size`` are split between the members by class counts (:func:`split_budget`).
    Settings (``DEFAULTS``): ``origin_prior``, ``negative_weight`` (the target and loss of
    :func:`member_target`, :func:`member_losses`), ``cross_member`` (the *other* column of
    :class:`MemberView`), ``balance`` (draw each member's share of a student batch uniformly
    over the member's classes, as each image's origin member labels it), ``cache_targets``
    (keep every member's logits on each bank image, computed once when it is made, and teach
    the student with them on augmented views, instead of running every member on every
    student batch; refused with ``student_mixup``).

    ``calibration`` (:class:`~dfkd.multi.calibrated.LogitCalibration`) is updated with every
    member's logits on each round's new images (the transfer images); the target's evidence
    reads it.
    """

    name = "per-member"

    def __init__(self, method: str, ensemble: TeacherEnsemble, image_shape, num_classes: int, device="cpu",
                 seed: int = 0, bn_priors=(), precision: str = "auto", settings: dict | None = None, **options):
        check_per_member(method)
        self.settings = check_settings(settings)
        cls = synthesizer_class(method)
        resolved = cls.resolve_options(options)
        if self.settings["cache_targets"] is not False and resolved.get("student_mixup"):
            raise SynthesizerOptionError("cache_targets keeps each bank image's targets, but student_mixup makes new "
                                         "images at every step: turn one of them off")
        self.method, self.ensemble = method, ensemble
        self.name = method  # what the run reports as its method
        self.teacher = ensemble
        self.bn_prior_models = list(bn_priors or ())
        self.image_shape = tuple(int(v) for v in image_shape)
        self.num_classes, self.device = int(num_classes), torch.device(device)
        self.precision = check_precision(precision)
        self.options = resolved
        self.batch_size = int(resolved["batch_size"])
        self.temperature = float(resolved["temperature"])
        self.student_steps_per_round = int(resolved["student_steps_per_round"])
        self.student_recipe = cls.student_recipe
        self.rng = torch.Generator().manual_seed(int(seed))
        counts = [int(ensemble.index(i).numel()) for i in range(len(ensemble))]
        self.counts = counts
        self.synthesis_split = split_budget(int(resolved.get("synthesis_batch_size", self.batch_size)), counts)
        self.batch_split = split_budget(self.batch_size, counts)
        self.pool_split = split_budget(int(resolved["pool_size"]), counts)
        self.calibration = LogitCalibration().to(self.device)
        self._new_logits: list[torch.Tensor] = []
        self.inners, self.views = [], []
        for i in range(len(ensemble)):
            other = bool(self.settings["cross_member"]) and counts[i] < self.num_classes
            member_options = dict(options, synthesis_batch_size=self.synthesis_split[i], batch_size=self.batch_split[i],
                                  pool_size=self.pool_split[i])
            if "balance_classes" in resolved:
                member_options["balance_classes"] = False  # the bank balances by the origin's own labels
            inner = create_synthesizer(method, MemberTeacher(ensemble, i, other).to(self.device),
                                       image_shape=self.image_shape, num_classes=counts[i], device=self.device,
                                       seed=int(seed) + 7919 * (i + 1), bn_priors=self.bn_prior_models,
                                       precision=self.precision, **member_options)
            if not isinstance(getattr(inner, "pool", None), ImagePool):
                raise SynthesizerOptionError(f"per-member synthesis needs a method that keeps a bank (pool); "
                                             f"{method!r} does not")
            inner.pool = OriginPool(self.pool_split[i], self._labeller(i))
            self.inners.append(inner)
            self.views.append(None)

    # -- the bank ----------------------------------------------------------------------------
    def _labeller(self, i: int):
        def on_add(images):
            with torch.no_grad(), self.autocast():
                union = self.ensemble.forward_all(images).union_logits.float()  # (T, n, K)
            self._new_logits.append(union)
            own = union[i].index_select(1, self.ensemble.index(i).to(union.device))
            return own.argmax(dim=1), (None if self.settings["cache_targets"] is False else union)
        return on_add

    def _views(self, student: nn.Module) -> list[MemberView]:
        if any(v is None or v.student is not student for v in self.views):
            self.views = [MemberView(student, self.ensemble.index(i).cpu(), self.num_classes,
                                     bool(self.settings["cross_member"]) and self.counts[i] < self.num_classes)
                          for i in range(len(self.inners))]
        return self.views

    # -- the interface -----------------------------------------------------------------------
    @property
    def images_synthesized(self) -> int:
        return sum(inner.images_synthesized for inner in getattr(self, "inners", []))

    @images_synthesized.setter
    def images_synthesized(self, value) -> None:  # the base class's reset; the members count
        pass

    def attach_student(self, student):
        for inner, view in zip(self.inners, self._views(student)):
            inner.attach_student(view)

    def plan(self, total_student_steps):
        for inner in self.inners:
            inner.plan(total_student_steps)

    def synthesize(self, student):
        """One round of every member (its first also runs the method's warm-up); the round's
        new images update the calibration. Returns each term averaged over members by their
        share of the images."""
        sums: dict[str, torch.Tensor] = {}
        total = sum(self.synthesis_split)
        for inner, view, n in zip(self.inners, self._views(student), self.synthesis_split):
            for key, value in inner.synthesize(view).items():
                sums[key] = sums.get(key, 0) + value * (n / total)
        if self._new_logits:
            self.calibration.update(torch.cat(self._new_logits, dim=1), self.ensemble.mask)
            self._new_logits = []
        return sums

    def _draw(self, i: int, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        pool = self.inners[i].pool
        idx = pool.sample_indices(n, self.rng, balanced=bool(self.settings["balance"]))
        return pool.images[idx], (pool.logits[idx].transpose(0, 1) if pool.logits is not None else None)

    def sample(self):
        images, logits, origin = [], [], []
        for i, n in enumerate(self.batch_split):
            x, z = self._draw(i, n)
            images.append(x)
            logits.append(z)
            origin.append(torch.full((n,), i, dtype=torch.long))
        images = torch.cat(images)
        o = self.options
        if o.get("student_augment", True):
            images = augment_batch(images, pad=int(o.get("crop_pad", 2)), flip=bool(o.get("flip", True)))
        if o.get("student_mixup", 0) > 0:
            images = mix_batch(images, o["student_mixup"])
        cached = None if any(z is None for z in logits) else torch.cat(logits, dim=1)
        return MemberBatch(images, origin=torch.cat(origin).to(images.device), union_logits=cached)

    def relabel(self, batch: MemberBatch) -> torch.Tensor:
        """Every member's logits ``(T, B, K)`` on the student batch: all fresh, all from the bank
        (``cache_targets=True``), or fresh for each image's origin member only (``"others"``:
        the batch holds each member's images in one block, so each member runs once)."""
        mode = self.settings["cache_targets"]
        if mode is True and batch.union_logits is not None:
            return batch.union_logits
        with torch.no_grad(), self.autocast():
            if mode is False or batch.union_logits is None:
                return self.ensemble.forward_all(batch.images).union_logits.float()
            union = batch.union_logits.clone()
            start = 0
            for i, n in enumerate(self.batch_split):
                z = self.ensemble.member_logits(i, batch.images[start:start + n])
                union[i, start:start + n] = self.ensemble.place(z, i)
                start += n
            return union

    def preview(self, n):
        parts = [self._draw(i, k)[0] for i, k in enumerate(split_budget(n, self.counts)) if k]
        return torch.cat(parts)[:n]

    def describe(self) -> dict:
        return {"method": self.method, "synthesis": "per-member", **self.options, "per_member": dict(self.settings),
                "synthesis_split": list(self.synthesis_split), "batch_split": list(self.batch_split)}

    def state_dict(self) -> dict:
        return {"rng": self.rng.get_state(), "calibration": self.calibration.state_dict(),
                "members": [inner.state_dict() for inner in self.inners]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["members"]) != len(self.inners):
            raise ValueError(f"the state holds {len(state['members'])} members' synthesis, the zoo has {len(self.inners)}")
        self.rng.set_state(state["rng"])
        self.calibration.load_state_dict(state["calibration"])
        for inner, inner_state in zip(self.inners, state["members"]):
            inner.load_state_dict(inner_state)

"""The synthesizer a teacher ensemble drives, with the ensemble's student loss."""
from __future__ import annotations

import torch
from torch import nn

from dfkd.multi.combine import Combiner, create_combiner
from dfkd.multi.features import FEATURE_METHODS, AmalgamationError, FeatureAmalgamator
from dfkd.multi.member_targets import member_losses, member_target
from dfkd.multi.per_member import PerMemberSynthesizer
from generators.wrapped import WrappedSynthesizer


# ----------------------------------------------------------------------------- the engine's view
class AmalgamationSynthesizer(WrappedSynthesizer):
    """A synthesizer driven by a :class:`~dfkd.multi.ensemble.TeacherEnsemble`, with the ensemble's
    student loss.

    It is a :class:`~generators.wrapped.WrappedSynthesizer`: its synthesis (``synthesize``, ``sample``,
    ``options``, ``name``, ``student_steps_per_round``, ``images_synthesized``, state ...) is the
    one of ``inner`` (built with the ensemble as its teacher). ``student_losses`` returns, for the student's
    step on a batch:

    - ``student_loss="combiner"`` (default): ``{"kd": T^2 KL(softmax(merged/T) || softmax(s/T))}``
      with the merged target of ``combine`` in *training* mode (so ``noisy``/``pate`` add
      their noise here and only here), or ``{"uhc": uhc_loss}`` for ``combine="uhc"``;
      ``T`` is the inner method's ``temperature``;
    - ``student_loss="method"``: the inner method's own student loss against the ensemble's
      merged logits (e.g. DFAD's L1, ZSKT's KL);
    - plus, with ``features`` (a :data:`FEATURE_METHODS` name), the feature terms of a
      :class:`FeatureAmalgamator` built in :meth:`attach_student`, each times ``feature_weight``.

    The adapters' parameters are returned by :meth:`extra_parameters`; the engine (after
    ``attach_student``) optimises them with the student.

    With per-member synthesis (``inner`` a :class:`~dfkd.multi.per_member.PerMemberSynthesizer`)
    the student's target is the origin-aware one of :func:`~dfkd.multi.per_member.member_target`
    (``{"kd", "negatives"}``, :func:`~dfkd.multi.per_member.member_losses`), whatever the combiner;
    the combiner still gives the ensemble's merged prediction (evaluation).

    Calibrated combiners (a ``calibration`` of running statistics, :mod:`dfkd.multi.calibrated`):
    this wrapper's training-mode combiner and the ensemble's own share one set of statistics,
    so what the student batches teach it is what the ensemble's predictions (the synthesizer's
    class terms, evaluation) read; with per-member synthesis a ``calibrated_concat`` shares the
    per-member bank's statistics instead. They are saved in :meth:`state_dict` (``"combiner"``).
    """

    def __init__(self, inner, ensemble, combine: str | Combiner = "mean_prob", combine_options: dict | None = None,
                 features: str | None = None, layers=None, feature_weight: float = 1.0,
                 feature_options: dict | None = None, student_loss: str = "combiner"):
        if student_loss not in ("combiner", "method"):
            raise ValueError(f"student_loss must be 'combiner' or 'method', got {student_loss!r}")
        if features is not None and features not in FEATURE_METHODS:
            raise AmalgamationError(f"unknown feature method {features!r}; known: {', '.join(FEATURE_METHODS)}")
        super().__init__(inner)
        self.ensemble = self.teacher = ensemble
        self.combiner = combine if isinstance(combine, Combiner) else create_combiner(combine, **dict(combine_options or {}))
        self.combiner.check_mask(ensemble.mask.cpu(), ensemble.names)
        self.per_member = inner if isinstance(inner, PerMemberSynthesizer) else None
        self._link_calibration()
        self.combiner.to(inner.device).train()
        self.features_method, self.layers = features, layers
        self.feature_options = dict(feature_options or {})
        self.feature_weight = float(feature_weight)
        self.student_loss = student_loss
        self.amalgamator: FeatureAmalgamator | None = None

    def _link_calibration(self) -> None:
        """One set of running statistics for this combiner, the ensemble's and per-member synthesis."""
        own = getattr(self.ensemble.combiner, "calibration", None)
        self._combiner_learns = False
        if own is None or type(self.ensemble.combiner) is not type(self.combiner):
            return
        if self.per_member is not None and self.combiner.name == "calibrated_concat":
            self.per_member.calibration = own  # the bank's images calibrate the ensemble's predictions
        else:
            self._combiner_learns = True  # the student batches calibrate them
        self.combiner.calibration = own

    def describe(self) -> dict:
        info = dict(self.inner.describe(), combine=self.combiner.name, student_loss=self.student_loss)
        if self.amalgamator is not None:
            info.update(features=self.amalgamator.describe(), feature_weight=self.feature_weight)
        return info

    # -- student side ------------------------------------------------------------------------
    def attach_student(self, student: nn.Module) -> None:
        self.inner.attach_student(student)
        if self.features_method is not None and self.amalgamator is None:
            self.amalgamator = FeatureAmalgamator(self.ensemble, student, self.layers, self.features_method,
                                                  **self.feature_options)

    def extra_parameters(self) -> list[nn.Parameter]:
        """Parameters the engine must optimise with the student (the feature adapters)."""
        if self.features_method is not None and self.amalgamator is None:
            raise RuntimeError("extra_parameters() is known only after attach_student(student)")
        return [] if self.amalgamator is None else list(self.amalgamator.parameters())

    def student_losses(self, student, batch):
        """Named student losses, the student's logits and the merged teacher logits."""
        if self.per_member is not None and getattr(batch, "origin", None) is not None:
            return self._member_losses(student, batch)
        if self.student_loss == "method":
            if self.amalgamator is not None:
                with torch.no_grad(), self.inner.autocast():
                    self.ensemble(batch.images)  # fresh teacher features for the taps
            losses, student_logits, merged = self.inner.student_losses(student, batch)
            losses = dict(losses)
        else:
            with torch.no_grad(), self.inner.autocast():
                out = self.ensemble.forward_all(batch.images, combiner=self.combiner)
            with self.inner.autocast():
                student_logits = student(batch.images).float()
            merged = out.merged
            key = "uhc" if self.combiner.name == "uhc" else "kd"
            losses = {key: self.combiner.loss(student_logits, out.union_logits, out.mask, self.inner.temperature,
                                              merged=merged)}
        if self.amalgamator is not None:
            for key, value in self.amalgamator.losses_from_taps().items():
                losses[key] = self.feature_weight * value
        return losses, student_logits, merged

    def _member_losses(self, student, batch):
        """The origin-aware target of per-member synthesis (class docstring)."""
        if self.amalgamator is None:
            union = self.per_member.relabel(batch)
        else:  # fresh logits, and fresh features for the taps
            with torch.no_grad(), self.inner.autocast():
                union = self.ensemble.forward_all(batch.images).union_logits
        mask = self.ensemble.mask
        if self._combiner_learns:
            self.combiner(union, mask)  # its statistics learn from the student batches
        settings = self.per_member.settings
        target, _ = member_target(union, mask, batch.origin, self.per_member.calibration, settings["origin_prior"])
        with self.inner.autocast():
            student_logits = student(batch.images).float()
        losses = member_losses(student_logits, target, batch.origin, mask, self.inner.temperature,
                               float(settings["negative_weight"]))
        if self.amalgamator is not None:
            for key, value in self.amalgamator.losses_from_taps().items():
                losses[key] = self.feature_weight * value
        return losses, student_logits, target.clamp_min(1e-8).log()

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"inner": self.inner.state_dict(), "combiner": self.combiner.state_dict()}
        if self.amalgamator is not None:
            state["features"] = self.amalgamator.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        if state.get("combiner"):
            self.combiner.load_state_dict(state["combiner"])
        if self.amalgamator is not None and "features" in state:
            self.amalgamator.load_state_dict(state["features"])

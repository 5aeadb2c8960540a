"""A synthesizer that is another's synthesis with a student loss of its own.

:class:`WrappedSynthesizer` is a :class:`~generators.base.Synthesizer` whose synthesis (``synthesize``,
``sample``, ``preview``, ``options``, ``name``, ``student_steps_per_round``, ``images_synthesized``,
``precision``, state ...) is the one of ``inner``; a subclass changes what the student learns
(``student_losses``) and may add trainable parts (``attach_student``, ``extra_parameters``) and
state. Teacher ensembles (:class:`dfkd.multi.synthesizer.AmalgamationSynthesizer`) and extra forms
of knowledge (:class:`dfkd.knowledge.terms.KnowledgeTerms`) are such wrappers.
"""
from __future__ import annotations

from torch import nn

from generators.base import Synthesizer


class WrappedSynthesizer(Synthesizer):
    """``inner``'s synthesis, with this class's student side (module docstring)."""

    def __init__(self, inner: Synthesizer):
        # not Synthesizer.__init__: the settings are the inner method's, shared, not copied
        self.inner, self.teacher = inner, inner.teacher
        self.bn_prior_models = inner.bn_prior_models
        self.image_shape, self.num_classes, self.device = inner.image_shape, inner.num_classes, inner.device
        self.batch_size, self.temperature = inner.batch_size, inner.temperature
        self.student_steps_per_round = inner.student_steps_per_round
        self.rng = inner.rng

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def options(self) -> dict:
        return self.inner.options

    @property
    def student_recipe(self) -> dict:
        return self.inner.student_recipe

    @property
    def precision(self) -> str:
        return self.inner.precision

    @property
    def images_synthesized(self) -> int:
        return self.inner.images_synthesized

    @images_synthesized.setter
    def images_synthesized(self, value: int) -> None:
        self.inner.images_synthesized = value

    def plan(self, total_student_steps: int) -> None:
        self.inner.plan(total_student_steps)

    def synthesize(self, student):
        return self.inner.synthesize(student)

    def sample(self):
        return self.inner.sample()

    def preview(self, n: int):
        return self.inner.preview(n)

    def describe(self) -> dict:
        return self.inner.describe()

    def attach_student(self, student: nn.Module) -> None:
        self.inner.attach_student(student)

    def extra_parameters(self) -> list[nn.Parameter]:
        return self.inner.extra_parameters()

    def student_losses(self, student, batch):
        return self.inner.student_losses(student, batch)

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])

"""Forms of knowledge added to any method's student loss (``knowledge:`` in a run config).

    knowledge:
      - {name: rkd, weight: 1.0}                 # relations between the batch's embeddings
      - {name: nst, weight: 50.0}                # paired block outputs
      - {name: pkd, options: {strategy: skip}}   # every block, mapped across depths
      - crd:0.8:num_negatives=1024               # NAME[:WEIGHT][:KEY=VALUE,...], as --knowledge takes it

:class:`KnowledgeTerms` wraps a synthesizer (:class:`~generators.wrapped.WrappedSynthesizer`):
synthesis is the method's; the student's loss on a batch is the method's terms plus, for each
entry, ``weight * K(student features, teacher features)`` under the entry's name (``weight``
defaults to the loss's ``suggested_weight``, else 1). The features come from forward hooks
(:class:`dfkd.core.taps.FeatureTap`) by what the loss says it needs (``layers``):

- ``embedding``: the penultimate features (the input of ``head_path``) of student and teacher;
- ``paired``: the last ``n`` blocks of each (``block_paths``), ``n`` the shorter of the two;
- ``sequence`` / ``all``: every block of each, in order (layer-mapping losses get the two
  depths as ``student_layers`` / ``teacher_layers`` unless the options give them);
- logits (``needs = "logits"``, DKD): the student's and teacher's logits of the method's step, with
  ``progress``, the fraction of the planned student steps done (DKD's warm-up reads it).

The student's features are those of the method's own student forward pass; the teacher runs
once more on the batch (without gradient) for its features. Trainable parts of a loss are
built by one probe pass in :meth:`KnowledgeTerms.attach_student` and optimised with the
student (:meth:`extra_parameters`); they are saved with the synthesizer's state.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dfkd.config import parse_value
from dfkd.core.taps import FeatureTap, block_paths, head_path
from dfkd.knowledge.registry import Knowledge, UnknownKnowledgeError, create_knowledge, knowledge_class
from generators.wrapped import WrappedSynthesizer


@dataclass
class Term:
    """One form of knowledge in a run: its name, weight and loss, and the paths it taps."""

    name: str
    weight: float
    loss: Knowledge
    student_paths: list[str]
    teacher_paths: list[str]
    capture: str  # "input" (the penultimate features) or "output" (block outputs)


def _entry_of_text(text: str) -> dict:
    """``NAME[:WEIGHT][:KEY=VALUE,...]`` (the command line's ``--knowledge``) as an entry; option values
    are read with YAML rules (``crd::num_negatives=1024`` keeps the suggested weight)."""
    name, _, rest = text.partition(":")
    weight, _, option_text = rest.partition(":")
    try:
        entry = {"name": name, **({"weight": float(weight)} if weight else {})}
    except ValueError:
        raise UnknownKnowledgeError(f"--knowledge {text}: give NAME[:WEIGHT][:KEY=VALUE,...], e.g. rkd:1.0 "
                                    "or crd:0.8:num_negatives=1024") from None
    options = {}
    for item in filter(None, option_text.split(",")):
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise UnknownKnowledgeError(f"--knowledge {text}: options go as KEY=VALUE after the weight, "
                                        "e.g. crd:0.8:num_negatives=1024")
        options[key.strip()] = parse_value(value)
    return {**entry, "options": options} if options else entry


def parse_knowledge(entries) -> list[dict]:
    """``knowledge:`` entries (``name``, ``name:weight``, ``name:weight:key=value,...``, or
    ``{name, weight, options}``) as dicts; refuses unknown names and keys with one line."""
    if entries is None:
        return []
    if isinstance(entries, (str, dict)):
        entries = [entries]
    parsed = []
    for entry in entries:
        if isinstance(entry, str):
            entry = _entry_of_text(entry)
        entry = dict(entry)
        unknown = sorted(set(entry) - {"name", "weight", "options"})
        if "name" not in entry or unknown:
            raise UnknownKnowledgeError(f"a knowledge entry takes name, weight and options; got {sorted(entry)}")
        knowledge_class(entry["name"])  # an unknown name lists the known ones
        weight = entry.get("weight")
        if weight is not None and (not isinstance(weight, (int, float)) or weight < 0):
            raise UnknownKnowledgeError(f"knowledge {entry['name']!r}: weight must be a number >= 0, got {weight!r}")
        parsed.append({"name": entry["name"], "weight": weight, "options": dict(entry.get("options") or {})})
    return parsed


def _paths(model: nn.Module, layers: str | None, kind: str) -> tuple[list[str], str]:
    if layers == "embedding":
        head = head_path(model)
        if head is None:
            raise UnknownKnowledgeError(f"{kind}: the {kind.split()[-1]} declares no head_path, so its penultimate "
                                        "features cannot be tapped")
        return [head], "input"
    blocks = list(block_paths(model))
    if layers in ("paired", "sequence", "all") and not blocks:
        raise UnknownKnowledgeError(f"{kind}: the {kind.split()[-1]} declares no block_paths to tap")
    return blocks, "output"


class KnowledgeTerms(WrappedSynthesizer):
    """``inner``'s synthesis and student loss plus forms of knowledge (module docstring)."""

    def __init__(self, inner, entries):
        super().__init__(inner)
        self.entries = parse_knowledge(entries)
        if not self.entries:
            raise UnknownKnowledgeError("KnowledgeTerms needs at least one knowledge entry")
        self.terms: list[Term] = []
        self._taps: tuple[FeatureTap, FeatureTap] | None = None
        self.step, self.total_steps = 0, 0  # student steps taken and planned (the progress logit losses get)

    def describe(self) -> dict:
        return dict(self.inner.describe(), knowledge=[{"name": t.name, "weight": t.weight} for t in self.terms])

    # -- student side ------------------------------------------------------------------------
    def attach_student(self, student: nn.Module) -> None:
        super().attach_student(student)
        if self.terms:
            return
        student_paths, teacher_paths = set(), set()
        for entry in self.entries:
            cls = knowledge_class(entry["name"])
            options = dict(entry["options"])
            s_paths, capture = _paths(student, cls.layers, f"knowledge {entry['name']!r}: the student")
            t_paths, _ = _paths(self.teacher, cls.layers, f"knowledge {entry['name']!r}: the teacher")
            if cls.needs == "logits":
                s_paths, t_paths = [], []
            elif cls.layers == "paired":
                n = min(len(s_paths), len(t_paths))
                s_paths, t_paths = s_paths[-n:], t_paths[-n:]
            elif cls.layers == "all":
                options.setdefault("student_layers", len(s_paths))
                options.setdefault("teacher_layers", len(t_paths))
            loss = create_knowledge(entry["name"], **options).to(self.device)
            weight = entry["weight"] if entry["weight"] is not None else (cls.suggested_weight or 1.0)
            self.terms.append(Term(entry["name"], float(weight), loss, s_paths, t_paths, capture))
            student_paths.update((p, capture) for p in s_paths)
            teacher_paths.update((p, capture) for p in t_paths)
        self._taps = (self._tap(student, student_paths), self._tap(self.teacher, teacher_paths))
        self._build(student)

    @staticmethod
    def _tap(model: nn.Module, paths: set) -> dict[str, FeatureTap]:
        by_capture: dict[str, list[str]] = {}
        for path, capture in sorted(paths):
            by_capture.setdefault(capture, []).append(path)
        return {capture: FeatureTap(model, ps, capture=capture) for capture, ps in by_capture.items()}

    def _features(self, taps: dict[str, FeatureTap], paths: list[str], capture: str) -> list[torch.Tensor]:
        return [taps[capture][p] for p in paths]

    def _build(self, student: nn.Module) -> None:
        """One probe pass (no gradient, the student in eval mode) so lazily built parts exist."""
        x = torch.rand(2, *self.image_shape, generator=self.rng).to(self.device)
        was_training = student.training
        student.eval()
        try:
            with torch.no_grad():
                s_logits, t_logits = student(x).float(), self.teacher(x).float()
                self._knowledge_losses(s_logits, t_logits)
        finally:
            student.train(was_training)

    def _knowledge_losses(self, student_logits, teacher_logits) -> dict[str, torch.Tensor]:
        student_taps, teacher_taps = self._taps
        losses = {}
        for term in self.terms:
            if term.loss.needs == "logits":  # with the fraction of training done (DKD's warm-up)
                value = term.loss(student_logits, teacher_logits, progress=(self.step + 1) / max(1, self.total_steps))
            else:
                value = term.loss(self._features(student_taps, term.student_paths, term.capture),
                                  [f.detach() for f in self._features(teacher_taps, term.teacher_paths, term.capture)])
            losses[term.name] = term.weight * value
        return losses

    def extra_parameters(self) -> list[nn.Parameter]:
        if self.entries and not self.terms:
            raise RuntimeError("extra_parameters() is known only after attach_student(student)")
        return [*self.inner.extra_parameters(), *(p for t in self.terms for p in t.loss.parameters())]

    def plan(self, total_student_steps: int) -> None:
        self.total_steps = int(total_student_steps)
        self.inner.plan(total_student_steps)

    def student_losses(self, student, batch):
        """The method's terms, then each form of knowledge's weighted term (module docstring)."""
        losses, student_logits, teacher_logits = self.inner.student_losses(student, batch)
        if any(t.loss.needs != "logits" for t in self.terms):
            with torch.no_grad(), self.inner.autocast():
                self.teacher(batch.images)  # the teacher's features of this batch, for the taps
        losses = dict(losses)
        clash = sorted(set(losses) & {t.name for t in self.terms})
        if clash:
            raise UnknownKnowledgeError(f"knowledge {clash[0]!r} has the name of one of the method's own terms")
        losses.update(self._knowledge_losses(student_logits, teacher_logits))
        self.step += 1
        return losses, student_logits, teacher_logits

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(), "knowledge": [t.loss.state_dict() for t in self.terms], "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        for term, saved in zip(self.terms, state.get("knowledge", [])):
            term.loss.load_state_dict(saved)
        self.step = int(state.get("step", 0))

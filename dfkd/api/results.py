"""What a run gives back: its result, or the error that it could not start as asked."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from teachers import load_checkpoint


class RunError(ValueError):
    """A run that cannot start as asked (missing input, occupied run directory ...)."""


@dataclass
class RunResult:
    """What a finished run returns: its directory and its ``summary.json`` as a dict."""

    run_dir: Path
    summary: dict

    @property
    def student_accuracy(self) -> float | None:
        return self.summary.get("student_accuracy")

    def load_student(self, map_location="cpu"):
        """The distilled student and its metadata (``student.pt``)."""
        return load_checkpoint(self.run_dir / "student.pt", map_location=map_location)

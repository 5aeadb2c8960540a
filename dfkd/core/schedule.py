"""Learning-rate schedules shared by the student's optimiser and the synthesizers' generators."""
from __future__ import annotations

import math


def cosine_factor(step: int, total: int) -> float:
    """Cosine annealing factor ``0.5 (1 + cos(pi * step / total))``."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def learning_rate_factor(schedule: str, step: int, total: int) -> float:
    """``cosine``: cosine annealing to 0; ``step``: x0.1 at 50% and 75% of the run;
    ``constant``: 1."""
    if schedule == "cosine":
        return cosine_factor(step, total)
    if schedule == "step":
        return 0.1 ** (int(step >= 0.5 * total) + int(step >= 0.75 * total))
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}; use cosine, step or constant")

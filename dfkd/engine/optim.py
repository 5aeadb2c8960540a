"""The student's optimiser and learning-rate schedule."""
from __future__ import annotations

import torch
from torch import nn


def build_student_optimizer(student: nn.Module, options: dict) -> torch.optim.Optimizer:
    name = options["student_optimizer"]
    lr = float(options["student_lr"])
    wd = float(options["student_weight_decay"])
    if name == "adam":
        return torch.optim.Adam(student.parameters(), lr=lr, weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(student.parameters(), lr=lr, momentum=float(options["student_momentum"]), weight_decay=wd, nesterov=True)
    raise ValueError(f"unknown student optimizer {name!r}; use 'adam' or 'sgd'")

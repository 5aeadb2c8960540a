"""A run's saved state (``state.pt``): its format, and reading it back safely.

``state.pt`` is a plain dict (``format``, the resolved ``config``, ``step``, ``elapsed``, the
student's and optimiser's state, the synthesizer's state and random state, ``metrics``,
``world_size``; under torchrun ``rank_states`` with every rank's synthesizer and random state).
It loads with ``weights_only=True``, so a hostile file never runs code.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from dfkd.engine.distributed import World

STATE_FORMAT = "dfkd-run-state/1"


class DistillationError(RuntimeError):
    """A run that cannot continue (non-finite loss, inconsistent resume state)."""


def read_state(path: Path, device: torch.device, world: World) -> dict:
    """The state in ``path`` for this process (its own rank's synthesizer and random state under
    torchrun); :class:`DistillationError` for a truncated, foreign or hostile file, or a state
    written by another number of processes."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # corrupt, foreign or hostile file (weights_only never runs its code)
        detail = " ".join(str(exc).split())[:200]
        raise DistillationError(f"cannot resume from {path}: it is truncated or not a run state "
                                f"({type(exc).__name__}: {detail})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise DistillationError(f"{path} is not a dfkd run state (format {STATE_FORMAT})")
    saved_world = int(state.get("world_size", 1))
    if saved_world != world.world_size:
        how = "without torchrun" if saved_world == 1 else f"with torchrun --nproc_per_node={saved_world}"
        raise DistillationError(f"{path} was written by {saved_world} process(es), this run has "
                                f"{world.world_size}; resume it {how}")
    if world.distributed:
        state.update(state["rank_states"][world.rank])
    return state

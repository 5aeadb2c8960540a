"""``dfkd.distill``: data-free distillation of one teacher checkpoint into a student."""
from __future__ import annotations

from pathlib import Path

from dfkd.api.config import DistillConfig
from dfkd.api.results import RunError, RunResult
from dfkd.api.runs import execute, resume_config
from teachers import is_pretrained_spec, load_teacher


def distill(config: DistillConfig | dict | None = None, *, resume: bool | str = False, overwrite: bool = False,
            progress: bool = True, command: str | None = None, say=lambda text: None, **fields) -> RunResult:
    """Distill ``config.teacher`` into ``config.student`` with ``config.method`` and write the
    run directory ``config.out``; returns a :class:`~dfkd.api.runs.RunResult`.

    ``config`` is a :class:`DistillConfig`, a mapping of its keys, or ``None``; keyword
    ``fields`` override it (``dfkd.distill(teacher="t.pt", method="fast", steps=200,
    out="runs/x")``). ``resume=RUN_DIR`` completes an unfinished run from its own
    ``config.yaml`` (continuing from ``state.pt``, or starting again if none was saved; ``fields``
    may then only change :data:`dfkd.engine.rundir.RESUME_FREE_KEYS`, e.g. ``device``);
    ``overwrite`` replaces a run (finished or not) in ``out``.
    """
    if resume:
        config, _ = resume_config(resume, DistillConfig, fields)
    else:
        base = config.to_dict() if isinstance(config, DistillConfig) else dict(config or {})
        config = DistillConfig.from_layers(base, fields)
    config.validate()
    if not config.out:
        raise RunError("distill needs --out RUN_DIR")
    if not config.teacher:
        raise RunError("distill needs --teacher PATH.pt (a checkpoint written by dfkd train-teacher or dfkd import-weights)")
    if not is_pretrained_spec(config.teacher) and not Path(config.teacher).is_file():
        raise RunError(f"teacher {config.teacher}: no such file; give a checkpoint written by dfkd train-teacher "
                       "or dfkd import-weights, or a pretrained name such as tv:resnet18:IMAGENET1K_V1")
    teacher, meta = load_teacher(config.teacher, map_location="cpu")
    return execute(config, teacher, meta, resume=bool(resume), overwrite=overwrite, progress=progress,
                   record={"teacher": str(config.teacher)}, command=command, say=say)

"""``dfkd.born_again``: born-again networks, generations of students of one architecture.

Furlanello, Lipton, Tschannen, Itti and Anandkumar, "Born-Again Neural Networks", ICML 2018.
Generation 1 learns from the teacher; generation ``k`` learns from

- ``teacher_of_next="last"`` (the paper's BAN chain, the default): generation ``k - 1``'s
  student, ``OUT/gen{k-1}/student.pt``, through :func:`dfkd.distill`;
- ``teacher_of_next="ensemble"``: the ensemble of every earlier generation, a zoo manifest
  ``OUT/teachers-gen{k}.yaml`` of their students merged by an averaging combiner
  (``combine``, default ``mean_prob``: ``p = 1/(k-1) sum_i p_i``), through
  :func:`dfkd.amalgamate` (shared synthesis; the student keeps the method's own loss, with the
  merged prediction as its teacher).

Each generation is an ordinary run directory ``OUT/gen{k}`` (the method, student and every
setting of ``config``; seed ``config.seed + k - 1``, so each generation starts from its own
weights), resumable on its own with ``dfkd distill --resume`` (``dfkd amalgamate --resume`` for
an ensemble-taught one). The answer is the BAN-ensemble: the generations' students averaged
by ``combine``. ``OUT/born_again.json`` records each generation's test accuracy (its run's
final one), the accuracy of the ensemble of generations ``1..k`` after each ``k``, and
``ensemble_accuracy``, the ensemble of all of them, on the test split the runs evaluate on.

``OUT/born_again.yaml`` keeps the settings; ``resume=OUT`` completes what is missing: it skips
finished generations, resumes an unfinished one and starts the rest (``generations`` may be
raised to add generations to a finished chain).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dfkd.api.amalgamate import amalgamate
from dfkd.api.config import AmalgamateConfig, DistillConfig
from dfkd.api.distill import distill
from dfkd.api.results import RunError, RunResult
from dfkd.api.runs import json_safe
from dfkd.config import load_yaml
from dfkd.data import open_dataset
from dfkd.engine import rundir
from dfkd.engine.evaluation import model_logits
from dfkd.engine.run import RunInterrupted
from dfkd.multi.combine import create_combiner, list_combiners
from teachers import ZOO_FORMAT, load_checkpoint
from teachers.device import resolve_device
from teachers.files import sha256_file, write_json, write_yaml

FORMAT = "dfkd-born-again/1"
SETTINGS, RECORD = "born_again.yaml", "born_again.json"
TEACHERS_OF_NEXT = ("last", "ensemble")


@dataclass
class BornAgainResult:
    """What :func:`born_again` returns: its directory, each generation's run and ``born_again.json``."""

    out: Path
    runs: list[RunResult]
    record: dict

    @property
    def ensemble_accuracy(self) -> float | None:
        return self.record.get("ensemble_accuracy")

    @property
    def accuracies(self) -> list[float | None]:
        return [g.get("student_accuracy") for g in self.record["generations"]]


def _settings(config, generations, teacher_of_next, combine, resume, overwrite, fields) -> tuple[Path, dict]:
    """The born-again settings of a new run, or those saved in ``OUT`` for a resume."""
    if resume:
        given = config.to_dict() if isinstance(config, DistillConfig) else dict(config or {})
        out = Path(resume if isinstance(resume, (str, os.PathLike)) else given.get("out") or fields.get("out") or "")
        if not (out / SETTINGS).is_file():
            raise RunError(f"--resume {out}: no {SETTINGS} there; is it a dfkd born-again directory?")
        saved = load_yaml(out / SETTINGS)
        if saved.get("format") != FORMAT:
            raise RunError(f"{out / SETTINGS} is not a born-again record ({FORMAT})")
        fixed = sorted(k for k, v in fields.items() if v is not None and (k not in rundir.RESUME_FREE_KEYS or k == "out"))
        for key, value in (("teacher_of_next", teacher_of_next), ("combine", combine)):
            if value is not None and value != saved[key]:
                fixed.append(key)
        if fixed:
            raise RunError(f"--resume {out} continues with its own {SETTINGS}; {', '.join(fixed)} cannot change "
                           "(only generations, device, data_root, log_every and checkpoint settings can)")
        base = DistillConfig.from_layers(saved["config"], {k: v for k, v in fields.items() if v is not None})
        settings = dict(saved, config=base.to_dict())
        if generations is not None:
            settings["generations"] = generations
    else:
        layer = config.to_dict() if isinstance(config, DistillConfig) else dict(config or {})
        base = DistillConfig.from_layers(layer, fields)
        settings = {"format": FORMAT, "generations": 2 if generations is None else generations,
                    "teacher_of_next": teacher_of_next or "last", "combine": combine or "mean_prob",
                    "config": base.to_dict()}
        if not base.out:
            raise RunError("born-again needs --out DIR (the generations are written to DIR/gen1, DIR/gen2, ...)")
        out = Path(base.out)
    base.validate()
    n = settings["generations"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RunError(f"--generations must be a whole number of at least 1, got {n!r}; e.g. --generations 3")
    if settings["teacher_of_next"] not in TEACHERS_OF_NEXT:
        raise RunError(f"--teacher-of-next must be last or ensemble, got {settings['teacher_of_next']!r}")
    if settings["combine"] not in list_combiners():
        raise RunError(f"--ensemble-combine {settings['combine']!r} is not a combiner; use mean_prob, mean_logits, ...")
    if not base.teacher:
        raise RunError("born-again needs --teacher PATH.pt (the teacher of the first generation)")
    if not resume and not overwrite:
        held = [p.name for p in [out / SETTINGS, out / RECORD, *(out / f"gen{k}" for k in range(1, n + 1))]
                if p.exists() and (p.is_file() or rundir.run_status(p) not in ("missing", "empty"))]
        if held:
            raise RunError(f"{out} already holds a born-again run ({', '.join(held)}); complete it with --resume {out}, "
                           "or pass --overwrite to replace it, or choose another --out")
    return out, settings


def _write_manifest(path: Path, students: list[Path]) -> None:
    """A zoo manifest (:mod:`teachers.zoo`) of the earlier generations' students."""
    entries = [{"name": s.parent.name, "path": os.path.relpath(s.resolve(), path.resolve().parent),
                "sha256": sha256_file(s)} for s in students]
    write_yaml(path, {"format": ZOO_FORMAT, "teachers": entries})


def _generation(out: Path, k: int, settings: dict, base: dict, resume: bool, overwrite: bool, run_kwargs: dict):
    """Run (or resume, or skip when finished) generation ``k``; its result and teacher."""
    gen_dir = out / f"gen{k}"
    ensemble = k > 1 and settings["teacher_of_next"] == "ensemble"
    teacher = (str(base["teacher"]) if k == 1 else str(out / f"gen{k - 1}" / rundir.STUDENT) if not ensemble
               else str(out / f"teachers-gen{k}.yaml"))
    status = rundir.run_status(gen_dir)
    if status == "finished" and (resume or not overwrite):
        run_kwargs["say"](f"generation {k}: {gen_dir} is finished")
        return RunResult(gen_dir, json.loads((gen_dir / rundir.SUMMARY).read_text(encoding="utf-8"))), teacher
    job = amalgamate if ensemble else distill
    if resume and status not in ("missing", "empty"):
        free = {key: base[key] for key in rundir.RESUME_FREE_KEYS if key != "out" and base.get(key) is not None}
        return job(resume=str(gen_dir), **free, **run_kwargs), teacher
    layer = {key: value for key, value in base.items() if key != "teacher"}
    layer.update(out=str(gen_dir), seed=int(base["seed"]) + k - 1)
    if ensemble:
        _write_manifest(Path(teacher), [out / f"gen{i}" / rundir.STUDENT for i in range(1, k)])
        config = AmalgamateConfig.from_layers(layer, {"zoo": teacher, "combine": settings["combine"],
                                                      "synthesis": "shared", "student_loss": "method"})
    else:
        config = DistillConfig.from_layers(layer, {"teacher": teacher})
    run_kwargs["say"](f"generation {k}: {gen_dir}, taught by {teacher}")
    return job(config, overwrite=overwrite, **run_kwargs), teacher


def ensemble_accuracies(students: list[Path], base: dict, combine: str) -> tuple[list, dict]:
    """The accuracy of the ensemble (``combine``) of the first ``k`` students, for every ``k``,
    on the test split the runs evaluated on."""
    models = [load_checkpoint(path) for path in students]
    meta = models[0][1]
    dataset = base.get("eval_dataset") or meta["dataset"]
    test = open_dataset(dataset, "test", root=base.get("data_root"), download=bool(base.get("download")),
                        classes=list(meta["classes"]), image_size=int(meta["image_shape"][1]))
    device = resolve_device(base.get("device") or "auto")
    logits = torch.stack([model_logits(model, test, device).float() for model, _ in models])
    labels = test.labels.cpu()
    combiner = create_combiner(combine).eval()
    mask = torch.ones(logits.shape[0], logits.shape[2], dtype=torch.bool)
    with torch.no_grad():
        merged = [combiner(logits[:k], mask[:k]).argmax(1) for k in range(1, len(models) + 1)]
    return [float((m == labels).float().mean()) for m in merged], {"eval_dataset": dataset, "test_images": len(labels)}


def born_again(config: DistillConfig | dict | None = None, *, generations: int | None = None,
               teacher_of_next: str | None = None, combine: str | None = None, resume: bool | str = False,
               overwrite: bool = False, progress: bool = True, command: str | None = None, say=lambda text: None,
               **fields) -> BornAgainResult:
    """Train ``generations`` (default 2) born-again generations into ``config.out``; see the
    module docstring. ``config`` and ``fields`` are those of :func:`dfkd.distill`
    (``config.teacher`` teaches the first generation); ``teacher_of_next`` is ``"last"`` or
    ``"ensemble"``; ``combine`` (a combiner of :mod:`dfkd.multi.combiners`, default ``mean_prob``)
    merges the ensembles. ``resume=OUT`` (or ``True`` with ``config.out``) completes an unfinished
    chain; ``overwrite`` replaces the runs in ``OUT``."""
    out, settings = _settings(config, generations, teacher_of_next, combine, resume, overwrite, fields)
    base = settings["config"]
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    if overwrite and not resume and (out / RECORD).exists():
        (out / RECORD).unlink()
    write_yaml(out / SETTINGS, settings)
    run_kwargs = {"progress": progress, "command": command, "say": say}
    runs, rows = [], []
    try:
        for k in range(1, settings["generations"] + 1):
            result, teacher = _generation(out, k, settings, base, bool(resume), overwrite, run_kwargs)
            runs.append(result)
            rows.append({"generation": k, "run_dir": f"gen{k}", "teacher": teacher, "seed": int(base["seed"]) + k - 1,
                         "student_accuracy": result.summary.get("student_accuracy")})
    except RunInterrupted as exc:  # the chain resumes as a whole
        raise RunInterrupted(out, exc.saved_step) from None
    except BaseException:
        if not resume and rundir.run_status(out / "gen1") in ("missing", "empty"):  # nothing began: leave nothing
            (out / SETTINGS).unlink(missing_ok=True)
            if created and not any(out.iterdir()):
                out.rmdir()
        raise
    record = {"format": FORMAT, "teacher": str(base["teacher"]), "teacher_accuracy": runs[0].summary.get("teacher_accuracy"),
              "method": base["method"], "student": base["student"], "teacher_of_next": settings["teacher_of_next"],
              "combine": settings["combine"], "generations": rows, "ensemble_accuracy": None}
    if not base.get("no_eval"):
        merged, where = ensemble_accuracies([r.run_dir / rundir.STUDENT for r in runs], base, settings["combine"])
        for row, ensemble in zip(rows, merged):
            row["ensemble_accuracy"] = ensemble
        record.update(where, ensemble_accuracy=merged[-1])
    write_json(out / RECORD, json_safe(record))
    return BornAgainResult(out, runs, record)

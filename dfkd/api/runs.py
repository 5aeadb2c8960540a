"""One distillation run from a resolved config to a finished run directory.

:func:`execute` is shared by :func:`dfkd.distill` and :func:`dfkd.amalgamate`: it prepares the
run directory, builds the student and the synthesizer, runs the engine, then writes, in this
order, ``student.pt``, ``samples.pt`` and the plots, ``summary.json`` and, last,
``report.md``. A run is finished when ``report.md`` exists (:mod:`dfkd.engine.rundir`); a run
killed before that is resumed with ``resume=True``, which completes whatever is missing.
"""
from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from dfkd.api.config import RunConfig
from dfkd.data import load_dataset
from dfkd.engine.evaluation import EvalData
from dfkd.engine.optim import StudentOptim
from dfkd.engine.run import DistillationRun, RunOptions
from dfkd.reporting.analysis import analyze_run
from dfkd.reporting.report import write_report
from generators import synthesizer_class
from teachers import build_model, freeze, load_checkpoint
from teachers.device import resolve_device, seed_everything
from teachers.files import write_json, write_yaml

log = logging.getLogger("dfkd")

#: the files of a run directory that a new run (``overwrite=True``) replaces
RUN_FILES = ("summary.json", "state.pt", "metrics.csv", "synthesizer.pt", "student.pt", "report.md", "samples.pt",
             "config.yaml")


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


def setup_logging(run_dir: Path) -> None:
    """Log to ``run_dir/run.log`` (and nowhere else)."""
    root = logging.getLogger("dfkd")
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.FileHandler(run_dir / "run.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root.addHandler(handler)
    root.propagate = False


def prepare_run_dir(out: Path, overwrite: bool) -> None:
    """Refuse to write into a directory that holds a run unless ``overwrite``; then clear it."""
    if (out / "summary.json").exists() and not overwrite:
        raise RunError(f"{out} already holds a finished run (summary.json); choose another --out, "
                       f"or pass --overwrite to replace it, or --resume {out} to continue an unfinished one")
    if overwrite and out.exists():
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def resume_config(run_dir, config_class: type[RunConfig]):
    """The resolved config of an unfinished run and whether it has a state to resume from."""
    from dfkd.config import load_yaml

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise RunError(f"--resume {run_dir}: no config.yaml there; is it a dfkd run directory?")
    if (run_dir / "summary.json").exists():
        raise RunError(f"--resume {run_dir}: the run already finished (summary.json exists)")
    config = config_class.from_layers(load_yaml(run_dir / "config.yaml"), {"out": str(run_dir)})
    return config, (run_dir / "state.pt").exists()


def load_bn_priors(paths, meta: dict, device) -> tuple[list, list[dict]]:
    """The frozen BN-prior models of ``bn_priors`` (:mod:`generators.priors`) and a record of
    each for the summary. Each must take the teacher's images (same image shape); one trained
    on another data set only earns a warning."""
    models, records = [], []
    for path in paths or []:
        if not Path(path).is_file():
            raise RunError(f"BN prior {path}: no such file; give a checkpoint written by dfkd train-teacher or dfkd import-weights")
        model, prior_meta = load_checkpoint(path, map_location="cpu")
        shape = list(prior_meta.get("image_shape", []))
        if shape != list(meta["image_shape"]):
            raise RunError(f"BN prior {path} takes images of shape {shape}, the teacher {list(meta['image_shape'])}; "
                           "a prior must be trained on the teacher's kind of images")
        if prior_meta.get("dataset") != meta.get("dataset"):
            print(f"warning: BN prior {path} was trained on {prior_meta.get('dataset')!r}, the teacher on "
                  f"{meta.get('dataset')!r}; its statistics pull the images towards its own data", file=sys.stderr)
        models.append(model.to(device))  # generators.priors.BNPriors freezes them
        records.append({"path": str(path), "arch": getattr(model, "arch", None), "dataset": prior_meta.get("dataset"),
                        "classes": len(prior_meta.get("classes", [])), "test_accuracy": prior_meta.get("test_accuracy")})
    return models, records


def analyze(out: Path, teacher, student, synth, eval_data, meta, device, n_samples: int) -> dict:
    """Plots and sample-quality metrics after a run (a failed plot never fails the run)."""
    samples = synth.preview(n_samples).cpu()
    torch.save(samples, out / "samples.pt")
    try:
        result = analyze_run(out, teacher, student, samples,
                             real_images=None if eval_data is None else eval_data.images,
                             real_labels=None if eval_data is None else eval_data.labels,
                             class_names=list(meta["class_names"]), device=device)
    except Exception as exc:  # plots are a report, not the result: keep the run
        log.exception("analysis failed")
        print(f"warning: plots/metrics failed: {exc}", file=sys.stderr)
        return {"analysis_error": str(exc)}
    plots = result.pop("plots", [])
    sure_teacher = result.pop("sure_teacher", None)
    return {"sample_quality": result, "plots": plots, **({"sure_teacher": sure_teacher} if sure_teacher else {})}


def json_safe(value):
    """``value`` with every NaN or infinite float replaced by ``None`` (JSON holds neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


SynthesizerFactory = Callable[..., object]
SummaryExtras = Callable[[nn.Module, torch.device], dict]


def execute(config: RunConfig, teacher: nn.Module, meta: dict, *, resume: bool = False, overwrite: bool = False,
            progress: bool = True, make_synthesizer: SynthesizerFactory | None = None,
            summary_extras: SummaryExtras | None = None, real_images: torch.Tensor | None = None,
            record: dict | None = None, command: str | None = None, say: Callable[[str], None] = lambda text: None) -> RunResult:
    """Run ``config`` with ``teacher`` (a model or an ensemble, with its checkpoint-style
    ``meta``) into ``config.out``; see the module docstring for what is written when."""
    from generators import create_synthesizer

    cfg = config.to_dict()
    if not cfg["out"]:
        raise RunError("a run needs an output directory (--out RUN_DIR)")
    out = Path(cfg["out"])
    synthesizer_class(cfg["method"])  # unknown method: error listing the known ones, before any work
    if not resume:
        prepare_run_dir(out, overwrite)
    setup_logging(out)
    seed_everything(cfg["seed"])
    device = resolve_device(cfg["device"])

    teacher = freeze(teacher.to(device))
    classes = list(meta["classes"])
    channels, height, _ = meta["image_shape"]
    student = build_model(cfg["student"], len(classes), channels, height, meta["mean"], meta["std"]).to(device)

    options = dict(cfg["options"])
    if cfg["batch_size"]:
        options["batch_size"] = cfg["batch_size"]
    if cfg["method"] == "real":  # the upper bound: KD on real, unlabeled training images
        if real_images is None:
            train = load_dataset(cfg["eval_dataset"] or meta["dataset"], "train", root=cfg["data_root"],
                                 download=cfg["download"], classes=classes, image_size=height)
            real_images = train.images
        options["images"] = real_images
    bn_priors, prior_records = load_bn_priors(cfg["bn_priors"], meta, device)
    synth = (make_synthesizer or create_synthesizer)(
        cfg["method"], teacher, image_shape=meta["image_shape"], num_classes=len(classes), device=device,
        seed=cfg["seed"], **({"bn_priors": bn_priors} if bn_priors else {}), **options)
    cfg["options"] = dict(synth.options)  # resolved: every method option with its value
    student_optim = StudentOptim.resolve(synth.student_recipe, cfg)
    cfg.update(student_optim.as_config())  # resolved: the student's optimiser as run
    write_yaml(out / "config.yaml", cfg)

    eval_data = None
    if not cfg["no_eval"]:
        dataset = cfg["eval_dataset"] or meta["dataset"]
        test = load_dataset(dataset, "test", root=cfg["data_root"], download=cfg["download"], classes=classes,
                            image_size=height)
        eval_data = EvalData(test.images, test.labels, dataset)

    student_meta = {k: meta[k] for k in ("dataset", "classes", "class_names", "mean", "std", "image_shape")}
    student_meta.update(seed=cfg["seed"], config=cfg, method=cfg["method"], **(record or {}))
    run = DistillationRun(
        teacher, student, synth, out,
        RunOptions(steps=cfg["steps"], eval_every=cfg["eval_every"], log_every=cfg["log_every"],
                   checkpoint_every=cfg["checkpoint_every"], progress=progress, seed=cfg["seed"],
                   student_ema=float(cfg["student_ema"] or 0.0), student_optim=student_optim,
                   extra_summary={"student": cfg["student"], "class_names": list(meta["class_names"]),
                                  "device": str(device), **(record or {}),
                                  **({"command": command} if command else {}),
                                  **({"bn_priors": prior_records} if prior_records else {})}),
        eval_data=eval_data, student_meta=student_meta, teacher_accuracy=meta.get("test_accuracy"), device=device,
    )
    if resume:
        run.load_state()
        say(f"resuming {out} at step {run.step}/{cfg['steps']}")
    summary = run.run()
    summary.update(analyze(out, teacher, student, synth, eval_data, meta, device, cfg["samples"]))
    if summary_extras is not None:
        summary.update(summary_extras(student, device))
    write_json(out / "summary.json", json_safe(summary))
    try:
        write_report(out)
    except Exception as exc:  # pragma: no cover - the report reads what exists
        print(f"warning: report failed: {exc}", file=sys.stderr)
    return RunResult(out, summary)

"""One distillation run from a resolved config to a finished run directory.

:func:`execute` is shared by :func:`dfkd.distill` and :func:`dfkd.amalgamate`. It checks the
config, the method's options, the device and the memory a batch needs, and builds the
student, the synthesizer and the evaluation data, all before it touches the run directory;
then it holds the directory's :class:`~dfkd.engine.rundir.RunLock` for the whole run, runs the
engine and writes, in this order, ``student.pt``, ``samples.pt`` and the plots,
``summary.json`` and, last, ``report.md``. A run is finished when ``report.md`` exists
(:mod:`dfkd.engine.rundir`); a run killed before that is resumed with ``resume=True``, which
completes whatever is missing. A new run that fails before its first step leaves no
directory behind if it created it (and only removes its own files from one that existed).

Launched by ``torchrun`` (:mod:`dfkd.engine.distributed`), every rank builds the same student
and its own synthesizer (seeded by rank, with ``batch_size / world_size`` and
``synthesis_batch_size / world_size`` images, so the global batch is the configured one, and
the config keeps the global sizes); rank 0 alone takes the lock, prepares the directory and
writes every file, and tells the others whether the run starts and from what state.
"""
from __future__ import annotations

import logging
import math
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from dfkd.api.config import RunConfig
from dfkd.api.preflight import check_memory
from dfkd.api.results import RunError, RunResult
from dfkd.data import list_datasets, open_dataset
from dfkd.data.folder import ImageFolderSet
from dfkd.engine import rundir
from dfkd.engine.distributed import broadcast_object, init_from_env, per_rank_batch, rank_seed, shutdown
from dfkd.engine.evaluation import EvalData
from dfkd.engine.optim import StudentOptim
from dfkd.engine.run import DistillationRun, RunInterrupted, RunOptions
from dfkd.engine.rundir import RunLock, clear_run_files, remove_stale_temps, run_status
from dfkd.knowledge.peers import PeerCohort
from dfkd.knowledge.terms import KnowledgeTerms
from dfkd.reporting.analysis import analyze_run
from dfkd.reporting.report import write_report
from generators import synthesizer_class
from teachers import build_model, freeze, load_checkpoint
from teachers.device import resolve_device, seed_everything
from teachers.files import torch_save, write_error, write_json, write_yaml

log = logging.getLogger("dfkd")

#: the files of a run directory (:data:`dfkd.engine.rundir.RUN_FILES`)
RUN_FILES = rundir.RUN_FILES
#: test images the plots and sample-quality metrics read (all of them for MNIST, Fashion-MNIST, CIFAR)
ANALYSIS_IMAGES = 10_000
def check_new_run_dir(out: Path, overwrite: bool) -> None:
    """Refuse a new run into a directory that holds one (finished or not) unless ``overwrite``,
    which deletes that run's files (:data:`dfkd.engine.rundir.OWNED_FILES`). Hold the lock."""
    status = run_status(out)
    if status in ("started", "training", "trained") and not overwrite:
        raise RunError(f"{out} holds an unfinished run ({status}); continue it with --resume {out}, "
                       "or pass --overwrite to replace it, or choose another --out")
    if status == "finished" and not overwrite:
        raise RunError(f"{out} already holds a finished run (report.md); choose another --out, "
                       "or pass --overwrite to replace it")
    if overwrite:
        clear_run_files(out)


def resume_config(run_dir, config_class: type[RunConfig], changes: dict | None = None):
    """The saved config of the unfinished run in ``run_dir`` (:func:`dfkd.engine.rundir.run_status`:
    finished, or no run at all, is refused) with ``changes`` to keys that do not change the run
    (:data:`dfkd.engine.rundir.RESUME_FREE_KEYS`; others are refused), and whether it has a
    state to continue from (training/trained; a started run restarts from its config)."""
    from dfkd.config import load_yaml

    changes = {k: v for k, v in (changes or {}).items() if v is not None}
    fixed = sorted(set(changes) - set(rundir.RESUME_FREE_KEYS) | ({"out"} & set(changes)))
    if fixed:
        raise RunError(f"--resume {run_dir} continues the run with its own config.yaml; {', '.join(fixed)} cannot "
                       f"change (only {', '.join(k for k in rundir.RESUME_FREE_KEYS if k != 'out')} can)")
    run_dir = Path(run_dir)
    status = run_status(run_dir)
    if status in ("missing", "empty"):
        raise RunError(f"--resume {run_dir}: no config.yaml there; is it a dfkd run directory?")
    if status == "finished":
        raise RunError(f"--resume {run_dir}: the run already finished (report.md exists); "
                       "start a new run with another --out, or with --overwrite")
    config = config_class.from_layers(load_yaml(run_dir / rundir.CONFIG), {"out": str(run_dir)}, changes)
    return config, (run_dir / rundir.STATE).is_file()


def _missing_dirs(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _remove_failed_start(out: Path, created: list[Path], wrote: list[str]) -> None:
    """Undo a new run that failed before its first step: its directory if it made it (and the
    empty parents it made), else only the files it wrote."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
        for parent in created[1:]:
            try:
                parent.rmdir()  # only if empty: another run may have started there meanwhile
            except OSError:
                break
        return
    for name in wrote:
        try:
            (out / name).unlink()
        except OSError:
            pass


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


def transfer_images(cfg: dict, meta: dict):
    """The images of ``--transfer-set``: a folder (streamed, :class:`dfkd.data.folder.ImageFolderSet`)
    or the training images of a data set by name (every class, labels unused), at the teacher's
    image shape."""
    source = str(cfg["transfer_set"])
    if Path(source).is_dir() or source not in list_datasets():
        return ImageFolderSet(source, meta["image_shape"])  # a missing folder gets its own error
    channels, height, _ = meta["image_shape"]
    train = open_dataset(source, "train", root=cfg["data_root"], download=cfg["download"], image_size=height)
    if train.pixels.shape[1] != channels:
        raise RunError(f"--transfer-set {source}: its images have {train.pixels.shape[1]} channel(s), the teacher "
                       f"takes {channels}")
    return train  # read a batch at a time (labels unused)


def analyze(out: Path, teacher, student, synth, eval_data, meta, device, n_samples: int) -> dict:
    """Plots and sample-quality metrics after a run (a failed plot never fails the run; a
    disk that cannot take them does: :class:`teachers.files.FileWriteError`)."""
    samples = synth.preview(n_samples).cpu()
    torch_save(out / rundir.SAMPLES, samples)
    real_images, real_labels = (None, None) if eval_data is None else eval_data.head(ANALYSIS_IMAGES)
    try:
        result = analyze_run(out, teacher, student, samples, real_images=real_images, real_labels=real_labels,
                             class_names=list(meta["class_names"]), device=device)
    except OSError as exc:  # the disk, not the plot: the run cannot finish here
        remove_stale_temps(out)
        raise write_error(Path(getattr(exc, "filename", None) or out / "samples.png"), exc) from None
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
    ``meta``) into ``config.out``; see the module docstring for what is written when.
    ``resume=True`` continues the run in ``config.out`` (whose config ``config`` is)."""
    config.validate()
    cfg = config.to_dict()
    if not cfg["out"]:
        raise RunError("a run needs an output directory (--out RUN_DIR)")
    out = Path(cfg["out"])
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a directory; choose another --out")
    # everything that can be refused is refused before the run directory is touched
    options = dict(cfg["options"])
    if cfg["batch_size"]:
        options["batch_size"] = cfg["batch_size"]
    method = synthesizer_class(cfg["method"])  # unknown method: error listing the known ones
    resolved = method.resolve_options(options)  # unknown options, wrong types
    seed_everything(cfg["seed"])
    device = resolve_device(cfg["device"])
    check_memory(meta["image_shape"], resolved, cfg["samples"], device, cfg["steps"],
                 student_batch=method.student_batch_images(resolved))
    world, device = init_from_env(device)
    try:
        return _execute(cfg, out, options, resolved, world, device, teacher, meta, resume=resume,
                        overwrite=overwrite, progress=progress, make_synthesizer=make_synthesizer,
                        summary_extras=summary_extras, real_images=real_images, record=record, command=command,
                        say=say, defaults=type(config).defaults())
    finally:
        if world.distributed:
            shutdown()


def _execute(cfg, out, options, resolved, world, device, teacher, meta, *, resume, overwrite, progress,
             make_synthesizer, summary_extras, real_images, record, command, say, defaults) -> RunResult:
    """:func:`execute` once the config is checked and this process knows its rank and device."""
    from generators import create_synthesizer

    per_rank = {key: per_rank_batch(int(resolved[key]), world, key)
                for key in ("batch_size", "synthesis_batch_size") if world.distributed and resolved.get(key)}
    options.update(per_rank)

    teacher = freeze(teacher.to(device))
    classes = list(meta["classes"])
    channels, height, _ = meta["image_shape"]
    student = build_model(cfg["student"], len(classes), channels, height, meta["mean"], meta["std"]).to(device)
    if cfg["channels_last"]:
        student = student.to(memory_format=torch.channels_last)
    if world.distributed:  # the same student everywhere (DDP checks it), each rank its own draws
        seed_everything(rank_seed(cfg["seed"], world))

    if synthesizer_class(cfg["method"]).takes_images:  # real (KD on real images), dfnd (wild images)
        if cfg.get("transfer_set"):
            real_images = transfer_images(cfg, meta)
        elif cfg["method"] != "real":
            raise RunError(f"method {cfg['method']!r} learns from given images: pass --transfer-set DIR (a folder of "
                           "images or .npy shards) or --transfer-set DATASET (a data set's training images, e.g. digits)")
        elif real_images is None:  # the upper bound: the teacher's own training images, labels unused
            real_images = open_dataset(cfg["eval_dataset"] or meta["dataset"], "train", root=cfg["data_root"],
                                       download=cfg["download"], classes=classes, image_size=height)
        options["images"] = real_images
    options.update({arg: meta.get(key) for arg, key in synthesizer_class(cfg["method"]).teacher_meta_arguments.items()})
    bn_priors, prior_records = load_bn_priors(cfg["bn_priors"], meta, device)
    synth = (make_synthesizer or create_synthesizer)(
        cfg["method"], teacher, image_shape=meta["image_shape"], num_classes=len(classes), device=device,
        seed=rank_seed(cfg["seed"], world), precision=cfg["precision"], **({"bn_priors": bn_priors} if bn_priors else {}), **options)
    if cfg["knowledge"]:  # forms of knowledge on top of the method's student loss
        synth = KnowledgeTerms(synth, cfg["knowledge"])
    if cfg["peers"] > 1:  # deep mutual learning with peers - 1 peers
        synth = PeerCohort(synth, cfg["peers"] - 1, cfg["peer_arch"] or cfg["student"], meta["mean"], meta["std"],
                           weight=cfg["peer_weight"], seed=cfg["seed"], channels_last=cfg["channels_last"])
    cfg["options"] = {**synth.options, **{key: resolved[key] for key in per_rank}}  # resolved, global batch sizes
    student_optim = StudentOptim.resolve(synth.student_recipe, cfg)
    cfg.update(student_optim.as_config())  # resolved: the student's optimiser as run

    eval_data = None
    if not cfg["no_eval"]:
        dataset = cfg["eval_dataset"] or meta["dataset"]
        test = open_dataset(dataset, "test", root=cfg["data_root"], download=cfg["download"], classes=classes,
                            image_size=height)
        eval_data = EvalData.from_dataset(test, dataset)  # read a batch at a time

    student_meta = {k: meta[k] for k in ("dataset", "classes", "class_names", "mean", "std", "image_shape")}
    student_meta.update(seed=cfg["seed"], config=cfg, method=cfg["method"], **(record or {}))
    run_options = RunOptions(
        steps=cfg["steps"], eval_every=cfg["eval_every"], log_every=cfg["log_every"],
        checkpoint_every=cfg["checkpoint_every"], checkpoint_seconds=float(cfg["checkpoint_seconds"]), config=cfg,
        config_defaults=defaults,
        progress=progress and world.is_main, seed=cfg["seed"], world=world, student_ema=float(cfg["student_ema"] or 0.0), student_optim=student_optim,
        extra_summary={"student": cfg["student"], "class_names": list(meta["class_names"]), "device": str(device),
                       **(record or {}), **({"command": command} if command else {}),
                       **({"bn_priors": prior_records} if prior_records else {})})

    created = _missing_dirs(out) if world.is_main else []
    lock = RunLock(out).acquire() if world.is_main else None  # for the whole run: another process gets RunDirBusyError
    handler, run, wrote, has_state = None, None, [], False
    try:
        refusal = None
        if world.is_main:
            try:
                has_state = _prepare_run_dir(out, cfg, resume, overwrite, wrote)
                handler = rundir.open_run_log(out)
            except BaseException as exc:
                refusal = exc
        has_state, refused = broadcast_object((has_state, None if refusal is None else str(refusal)), world)
        if refusal is not None:
            raise refusal
        if refused is not None:
            raise RunError(f"rank 0 did not start the run: {refused}")
        run = DistillationRun(teacher, student, synth, out, run_options, eval_data=eval_data, student_meta=student_meta,
                              teacher_accuracy=meta.get("test_accuracy"), device=device)
        if has_state:
            run.load_state(config=cfg)
            if run.step >= cfg["steps"]:
                say(f"completing {out}: training had finished (step {run.step}); writing the student, analysis and report")
            else:
                say(f"resuming {out} at step {run.step}/{cfg['steps']}")
        elif resume:
            say(f"restarting {out} from its config.yaml (no state was saved)")
        summary = run.run()
        summary["options"] = dict(cfg["options"])  # the global batch sizes under torchrun
        if not world.is_main:  # rank 0 analyses, writes and reports
            return RunResult(out, summary)
        summary.update(analyze(out, teacher, student, synth, eval_data, meta, device, cfg["samples"]))
        if isinstance(synth, PeerCohort) and eval_data is not None:
            summary.update(synth.report(eval_data.images, eval_data.labels, device, student))
        if summary_extras is not None:
            summary.update(summary_extras(student, device))
        write_json(out / rundir.SUMMARY, json_safe(summary))
        try:
            write_report(out)  # last: report.md means finished
        except BaseException as exc:
            remove_stale_temps(out)
            error = write_error(out / rundir.REPORT, exc)
            if error is not None:
                raise error from None
            raise
        return RunResult(out, summary)
    except BaseException as exc:
        rundir.close_run_log(handler)
        handler = None
        before_first_step = run is None or (run.step == 0 and run.saved_step is None)
        if not resume and before_first_step:
            if world.is_main:
                _remove_failed_start(out, created, wrote)
            if isinstance(exc, RunInterrupted):  # nothing to resume: a plain interrupt
                raise KeyboardInterrupt from None
            raise
        if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, RunInterrupted):
            raise RunInterrupted(out, run.saved_step if run is not None else None) from None
        raise
    finally:
        rundir.close_run_log(handler)
        if lock is not None:
            lock.release()


def _prepare_run_dir(out: Path, cfg: dict, resume: bool, overwrite: bool, wrote: list[str]) -> bool:
    """Check the locked run directory for a new run or a resume, write ``config.yaml`` for a run
    that starts from nothing; whether there is a state to continue from."""
    status = run_status(out)
    if resume:
        if status == "finished":
            raise RunError(f"--resume {out}: the run already finished (report.md exists)")
        if status in ("missing", "empty"):
            raise RunError(f"--resume {out}: no config.yaml there; is it a dfkd run directory?")
        has_state = (out / rundir.STATE).is_file()
        if not has_state:  # started (or its state was lost): start again from the saved config
            clear_run_files(out, keep=(rundir.CONFIG,))
    else:
        check_new_run_dir(out, overwrite)
        has_state = False
    wrote.append(rundir.LOG)
    if not has_state:
        write_yaml(out / rundir.CONFIG, cfg)
        wrote.append(rundir.CONFIG)
    return has_state

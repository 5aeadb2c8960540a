"""The ``dfkd`` command line: one entry point, one subcommand per job.

``dfkd train-teacher | distill | amalgamate | evaluate | plot | zoo | import-weights | demo``.
Every subcommand's ``--help`` lists its options with their defaults. Commands that run
jobs accept ``--config FILE.yaml`` and trailing ``key=value`` overrides.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from dfkd.config import ConfigError

log = logging.getLogger("dfkd")


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------- helpers
def _setup_logging(run_dir: Path | None, quiet: bool) -> None:
    root = logging.getLogger("dfkd")
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(run_dir / "run.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        root.addHandler(handler)
    root.propagate = False


def _say(args, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(text, flush=True)


def _formatter(prog):
    return argparse.ArgumentDefaultsHelpFormatter(prog, max_help_position=34)


def dataset_meta(info) -> dict:
    """Checkpoint metadata of a data set (``dataset`` is its registry name)."""
    meta = info.to_meta()
    meta["dataset"] = meta.pop("name")
    return meta


# ----------------------------------------------------------------------------- train-teacher
TRAIN_DEFAULTS = {
    "dataset": "digits",
    "arch": "lenet5_bn",
    "classes": None,
    "epochs": 15,
    "batch_size": 128,
    "optimizer": None,
    "lr": None,
    "weight_decay": None,
    "augment": "crop",
    "seed": 0,
    "device": "auto",
    "data_root": None,
    "download": False,
    "image_size": None,
    "out": None,
}


def cmd_train_teacher(args) -> int:
    from dfkd.config import merge_config, load_yaml, parse_overrides
    from dfkd.data import load_dataset, parse_classes
    from dfkd.engine import resolve_device, seed_everything
    from teachers import build_model, save_checkpoint, train_classifier

    cfg = merge_config(TRAIN_DEFAULTS, load_yaml(args.config) if args.config else {},
                       {k: getattr(args, k) for k in TRAIN_DEFAULTS if getattr(args, k, None) not in (None, False)},
                       parse_overrides(args.overrides))
    if not cfg["out"]:
        raise CLIError("train-teacher needs --out PATH.pt (where to write the teacher checkpoint)")
    seed_everything(cfg["seed"])
    device = resolve_device(cfg["device"])
    classes = parse_classes(cfg["classes"])
    train = load_dataset(cfg["dataset"], "train", root=cfg["data_root"], download=cfg["download"], classes=classes, image_size=cfg["image_size"])
    test = load_dataset(cfg["dataset"], "test", root=cfg["data_root"], download=cfg["download"], classes=classes, image_size=cfg["image_size"])
    info = train.info
    channels, height, _ = info.image_shape
    model = build_model(cfg["arch"], info.num_classes, channels, height, info.mean, info.std).to(device)
    _say(args, f"training {cfg['arch']} on {info.name} ({len(train)} images, {info.num_classes} classes) for {cfg['epochs']} epochs on {device}")
    recipe = {k: cfg[k] for k in ("optimizer", "lr", "weight_decay") if cfg[k] is not None}
    started = time.perf_counter()
    result = train_classifier(model, train.images, train.labels, test.images, test.labels, epochs=cfg["epochs"],
                              batch_size=cfg["batch_size"], augment=cfg["augment"], seed=cfg["seed"], device=device,
                              progress=not args.quiet, **recipe)
    seconds = time.perf_counter() - started
    meta = dataset_meta(info)
    meta.update(test_accuracy=float(result["test_accuracy"]), seed=cfg["seed"], config=cfg, train_seconds=round(seconds, 1),
                per_class_accuracy=result["per_class_accuracy"])
    path = save_checkpoint(cfg["out"], model.cpu(), meta)
    print(f"test accuracy {result['test_accuracy']:.4f} ({info.name}, {len(test)} test images) in {seconds:.1f}s -> {path}")
    return 0


# ----------------------------------------------------------------------------- distill
DISTILL_DEFAULTS = {
    "teacher": None,
    "method": "dafl",
    "student": "lenet5_half",
    "steps": 1000,
    "batch_size": None,
    "seed": 0,
    "device": "auto",
    "out": None,
    "eval_dataset": None,
    "data_root": None,
    "download": False,
    "no_eval": False,
    "eval_every": 0,
    "log_every": 50,
    "checkpoint_every": 0,
    "student_ema": 0.0,
    "samples": 512,
    "bn_priors": [],
    "options": {},
}

# convenience flags that map onto method options (name on the command line -> option key)
METHOD_FLAGS = {
    "adi": ("adi", bool, "DeepInversion: add ADI's competition term against the student"),
    "temperature": ("temperature", float, "KD temperature of the student loss"),
    "student_lr": ("student_lr", float, "student learning rate"),
    "student_optimizer": ("student_optimizer", str, "student optimizer: adam or sgd"),
    "generator_lr": ("generator_lr", float, "generator learning rate (DAFL/ZSKT/DFAD)"),
    "bn_weight": ("bn_weight", float, "weight of the BatchNorm-statistics term (0 drops it)"),
    "iterations": ("iterations", int, "DeepInversion: optimisation steps per synthesized batch"),
}


def _distill_config(args) -> dict:
    from dfkd.config import load_yaml, merge_config, parse_overrides

    file_cfg = load_yaml(args.config) if args.config else {}
    flags = {k: getattr(args, k) for k in DISTILL_DEFAULTS if k != "options" and getattr(args, k, None) not in (None, False)}
    method_flags = {}
    for flag, (key, _, _) in METHOD_FLAGS.items():
        value = getattr(args, flag, None)
        if value not in (None, False):
            method_flags[key] = value
    flags["options"] = method_flags
    return merge_config(DISTILL_DEFAULTS, file_cfg, flags, parse_overrides(args.overrides))


def _prepare_run_dir(out: Path, overwrite: bool) -> None:
    if (out / "summary.json").exists() and not overwrite:
        raise CLIError(f"{out} already holds a finished run (summary.json); choose another --out, "
                       f"or pass --overwrite to replace it, or --resume {out} to continue an unfinished one")
    if overwrite and out.exists():
        for name in ("summary.json", "state.pt", "metrics.csv", "synthesizer.pt", "student.pt", "report.md"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def run_distillation(cfg: dict, args, resume: bool = False, teacher_override=None, synthesizer_factory=None) -> dict:
    """Build teacher, student and synthesizer from a resolved config and run."""
    from dfkd.config import write_yaml
    from dfkd.data import load_dataset
    from dfkd.engine import DistillationRun, EvalData, RunOptions, resolve_device, seed_everything
    from generators import create_synthesizer, synthesizer_class
    from teachers import build_model, freeze, load_checkpoint

    if not cfg["out"]:
        raise CLIError("distill needs --out RUN_DIR")
    out = Path(cfg["out"])
    if teacher_override is None and not cfg["teacher"]:
        raise CLIError("distill needs --teacher PATH.pt (a checkpoint written by dfkd train-teacher or dfkd import-weights)")
    synthesizer_class(cfg["method"])  # unknown method: error listing the known ones, before any work
    if not resume:
        _prepare_run_dir(out, getattr(args, "overwrite", False))
    _setup_logging(out, args.quiet)
    seed_everything(cfg["seed"])
    device = resolve_device(cfg["device"])

    if teacher_override is not None:
        teacher, meta = teacher_override
    else:
        teacher, meta = load_checkpoint(cfg["teacher"], map_location="cpu")
    teacher = freeze(teacher.to(device))
    classes = list(meta["classes"])
    channels, height, _ = meta["image_shape"]
    student = build_model(cfg["student"], len(classes), channels, height, meta["mean"], meta["std"]).to(device)

    options = dict(cfg["options"])
    if cfg["batch_size"]:
        options["batch_size"] = cfg["batch_size"]
    if cfg["method"] == "real" and synthesizer_factory is None:  # the upper bound: KD on the real, unlabeled train images
        train = load_dataset(cfg["eval_dataset"] or meta["dataset"], "train", root=cfg["data_root"],
                             download=cfg["download"], classes=classes, image_size=height)
        options["images"] = train.images
    bn_priors, prior_records = load_bn_priors(cfg["bn_priors"], meta, device)
    make_synthesizer = synthesizer_factory or create_synthesizer
    synth = make_synthesizer(cfg["method"], teacher, image_shape=meta["image_shape"], num_classes=len(classes),
                             device=device, seed=cfg["seed"], **({"bn_priors": bn_priors} if bn_priors else {}), **options)
    options.pop("images", None)
    cfg = dict(cfg, options=dict(synth.options))  # resolved: every method option with its value
    write_yaml(out / "config.yaml", cfg)

    eval_data = None
    if not cfg["no_eval"]:
        dataset = cfg["eval_dataset"] or meta["dataset"]
        test = load_dataset(dataset, "test", root=cfg["data_root"], download=cfg["download"], classes=classes,
                            image_size=height)
        eval_data = EvalData(test.images, test.labels, dataset)

    student_meta = {k: meta[k] for k in ("dataset", "classes", "class_names", "mean", "std", "image_shape")}
    student_meta.update(seed=cfg["seed"], config=cfg, teacher=str(cfg["teacher"]), method=cfg["method"])
    run = DistillationRun(
        teacher, student, synth, out,
        RunOptions(steps=cfg["steps"], eval_every=cfg["eval_every"], log_every=cfg["log_every"],
                   checkpoint_every=cfg["checkpoint_every"], progress=not args.quiet, seed=cfg["seed"],
                   student_ema=float(cfg["student_ema"] or 0.0),
                   extra_summary={"command": "dfkd " + " ".join(sys.argv[1:]), "student": cfg["student"],
                                  "class_names": list(meta["class_names"]), "device": str(device),
                                  **({"bn_priors": prior_records} if prior_records else {})}),
        eval_data=eval_data, student_meta=student_meta, teacher_accuracy=meta.get("test_accuracy"), device=device,
    )
    if resume:
        run.load_state()
        _say(args, f"resuming {out} at step {run.step}/{cfg['steps']}")
    summary = run.run()
    summary.update(_analyze(out, teacher, student, synth, eval_data, meta, device, cfg["samples"]))
    from dfkd.engine import atomic_json

    atomic_json(out / "summary.json", summary)
    _write_report(out)
    return summary


def load_bn_priors(paths, meta: dict, device) -> tuple[list, list[dict]]:
    """The frozen BN-prior models of ``--bn-prior`` / ``bn_priors`` (:mod:`generators.priors`)
    and a record of each for the summary. Each must take the teacher's images (same image
    shape); one trained on another data set only earns a warning."""
    from teachers import load_checkpoint

    models, records = [], []
    for path in paths or []:
        if not Path(path).is_file():
            raise CLIError(f"BN prior {path}: no such file; give a checkpoint written by dfkd train-teacher or dfkd import-weights")
        model, prior_meta = load_checkpoint(path, map_location="cpu")
        shape = list(prior_meta.get("image_shape", []))
        if shape != list(meta["image_shape"]):
            raise CLIError(f"BN prior {path} takes images of shape {shape}, the teacher {list(meta['image_shape'])}; "
                           "a prior must be trained on the teacher's kind of images")
        if prior_meta.get("dataset") != meta.get("dataset"):
            print(f"warning: BN prior {path} was trained on {prior_meta.get('dataset')!r}, the teacher on "
                  f"{meta.get('dataset')!r}; its statistics pull the images towards its own data", file=sys.stderr)
        models.append(model.to(device))  # generators.priors.BNPriors freezes them
        records.append({"path": str(path), "arch": getattr(model, "arch", None), "dataset": prior_meta.get("dataset"),
                        "classes": len(prior_meta.get("classes", [])), "test_accuracy": prior_meta.get("test_accuracy")})
    return models, records


def _analyze(out: Path, teacher, student, synth, eval_data, meta, device, n_samples: int) -> dict:
    """Plots and sample-quality metrics after a run (never fails the run)."""
    import torch

    try:
        from dfkd.analysis import analyze_run
    except ImportError:  # pragma: no cover - analysis module missing
        return {}
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


def _write_report(out: Path) -> None:
    try:
        from dfkd.report import write_report

        write_report(out)
    except Exception as exc:  # pragma: no cover
        print(f"warning: report failed: {exc}", file=sys.stderr)


def _print_summary(summary: dict, out) -> None:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.2f}%"

    print(f"method {summary['method']}: student {pct(summary.get('student_accuracy'))}, teacher {pct(summary.get('teacher_accuracy'))}, "
          f"agreement {pct(summary.get('agreement'))}, {summary['steps']} steps, {summary['wall_seconds']:.1f}s, "
          f"{summary['images_synthesized']} images synthesized")
    print(f"run directory: {out}  (report: {Path(out) / 'report.md'}, samples: {Path(out) / 'samples.png'})")


def resume_config(run_dir, defaults: dict) -> tuple[dict, bool]:
    """The resolved config of an unfinished run and whether it has a state to resume from."""
    from dfkd.config import load_yaml, merge_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise CLIError(f"--resume {run_dir}: no config.yaml there; is it a dfkd run directory?")
    if (run_dir / "summary.json").exists():
        raise CLIError(f"--resume {run_dir}: the run already finished (summary.json exists)")
    cfg = merge_config(defaults, load_yaml(run_dir / "config.yaml"))
    cfg["out"] = str(run_dir)
    return cfg, (run_dir / "state.pt").exists()


def cmd_distill(args) -> int:
    if args.resume:
        cfg, resume = resume_config(args.resume, DISTILL_DEFAULTS)
        summary = run_distillation(cfg, args, resume=resume)
    else:
        cfg = _distill_config(args)
        summary = run_distillation(cfg, args)
    _print_summary(summary, cfg["out"])
    return 0


# ----------------------------------------------------------------------------- evaluate
def cmd_evaluate(args) -> int:
    from dfkd.data import load_dataset
    from dfkd.engine import resolve_device
    from teachers import evaluate_classifier, load_checkpoint

    model, meta = load_checkpoint(args.model)
    device = resolve_device(args.device)
    dataset = args.dataset or meta["dataset"]
    test = load_dataset(dataset, "test", root=args.data_root, download=args.download, classes=meta["classes"],
                        image_size=meta["image_shape"][1])
    result = evaluate_classifier(model.to(device), test.images, test.labels, device=device)
    print(f"{args.model}: {meta.get('arch', '')} accuracy {100 * result['accuracy']:.2f}% on {dataset} test ({len(test)} images)")
    names = test.info.class_names
    for name, acc in zip(names, result["per_class_accuracy"]):
        print(f"  {name:>14s}: {'n/a' if acc is None else f'{100 * acc:.2f}%'}")
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in result.items() if k != "predictions"}, indent=2))
    return 0


# ----------------------------------------------------------------------------- import-weights
def cmd_import(args) -> int:
    from dfkd.data import dataset_info, parse_classes
    from teachers import import_state_dict

    info = dataset_info(args.dataset, classes=parse_classes(args.classes), image_size=args.image_size)
    meta = dataset_meta(info)
    meta.update(test_accuracy=None, seed=None, imported_from=str(args.src))
    arch_kwargs = {"num_classes": info.num_classes, "in_channels": info.image_shape[0], "image_size": info.image_shape[1]}
    path = import_state_dict(args.src, args.out, args.arch, arch_kwargs, meta)
    print(f"imported {args.src} as {args.arch} for {info.name} -> {path} (run dfkd evaluate --model {path} to measure it)")
    return 0


# ----------------------------------------------------------------------------- zoo
def cmd_zoo(args) -> int:
    from teachers import build_manifest, describe_manifest, format_table, verify_manifest

    if args.zoo_command == "build":
        manifest = build_manifest(args.directory, args.out)
        print(f"wrote {args.out} with {len(manifest['teachers'])} teachers")
    elif args.zoo_command == "verify":
        entries = verify_manifest(args.manifest)
        print(f"{args.manifest}: {len(entries)} teachers verified (sha256 and load)")
    elif args.zoo_command == "list":
        print(format_table(describe_manifest(args.manifest)))
    return 0


# ----------------------------------------------------------------------------- plot
def cmd_plot(args) -> int:
    import torch

    from dfkd.data import load_dataset
    from teachers import load_checkpoint, freeze

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").exists():
        raise CLIError(f"{run_dir} is not a dfkd run directory (no config.yaml)")
    from dfkd import plots

    if args.kind == "curves":
        if not (run_dir / "metrics.csv").exists():
            raise CLIError(f"{run_dir} has no metrics.csv (was the run evaluated?)")
        print(plots.plot_curves(run_dir / "metrics.csv", run_dir / "curves.png"))
        return 0
    from dfkd.config import load_yaml

    cfg = load_yaml(run_dir / "config.yaml")
    if not (run_dir / "samples.pt").exists():
        raise CLIError(f"{run_dir} has no samples.pt (the run did not finish)")
    samples = torch.load(run_dir / "samples.pt", map_location="cpu", weights_only=True)
    teacher, meta = load_checkpoint(cfg["teacher"])
    student, _ = load_checkpoint(run_dir / "student.pt")
    teacher, student = freeze(teacher), student.eval()
    real = None
    if args.kind in ("embedding", "confusion", "all", "samples"):
        try:
            real = load_dataset(meta["dataset"], "test", root=cfg.get("data_root"), classes=meta["classes"],
                                image_size=meta["image_shape"][1])
        except Exception as exc:
            if args.kind in ("embedding", "confusion"):
                raise
            print(f"note: real images not shown ({exc})", file=sys.stderr)
    from dfkd.analysis import analyze_run

    result = analyze_run(run_dir, teacher, student, samples, None if real is None else real.images,
                         None if real is None else real.labels, list(meta["class_names"]), embedding=args.embedding)
    for name in result.get("plots", []):
        if args.kind == "all" or name.startswith(args.kind if args.kind != "classes" else "classes"):
            print(run_dir / name)
    return 0


# ----------------------------------------------------------------------------- demo
# The demo's distillation recipe: configs/fashion-mnist/best.yaml's method, sized for digits.
DEMO_RECIPE = {"method": "fast", "student": "lenet5_half", "steps": 600, "eval_every": 200,
               "options": {"ngf": 8, "synthesis_batch_size": 128, "batch_size": 128, "student_steps_per_round": 10,
                           "temperature": 1.0, "student_lr": 0.05, "student_weight_decay": 5e-4}}


def cmd_demo(args) -> int:
    """Train (or reuse) a digits teacher, distill a student data-free, print the result."""
    out = Path(args.out)
    teacher_path = out / "teacher_lenet5_bn_digits.pt"
    started = time.perf_counter()
    if not teacher_path.exists():
        targs = argparse.Namespace(config=None, overrides=[], quiet=args.quiet, dataset="digits", arch="lenet5_bn",
                                   classes=None, epochs=30, batch_size=64, optimizer=None, lr=None, weight_decay=None,
                                   augment="crop", seed=args.seed, device=args.device, data_root=None, download=False,
                                   image_size=None, out=str(teacher_path))
        cmd_train_teacher(targs)
    else:
        print(f"reusing teacher {teacher_path}")
    from dfkd.config import merge_config

    cfg = merge_config(DISTILL_DEFAULTS, DEMO_RECIPE,
                       {"teacher": str(teacher_path), "out": str(out / "distill"), "seed": args.seed, "device": args.device})
    dargs = argparse.Namespace(quiet=args.quiet, overwrite=True)
    summary = run_distillation(cfg, dargs)
    _print_summary(summary, cfg["out"])
    print(f"demo finished in {time.perf_counter() - started:.0f}s")
    return 0


# ----------------------------------------------------------------------------- parser
def add_run_arguments(p) -> None:
    """Options every distillation-style command shares (distill, amalgamate)."""
    p.add_argument("--steps", type=int, help="student optimisation steps (default 1000)")
    p.add_argument("--batch-size", type=int, help="images per student step (default: the method's)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--device", help="auto, cpu, cuda, mps (default auto)")
    p.add_argument("--out", help="run directory")
    p.add_argument("--data-root", help="directory with the data set's files")
    p.add_argument("--download", action="store_true", help="download the data set if missing")
    p.add_argument("--no-eval", action="store_true", help="skip evaluation on real test data")
    p.add_argument("--eval-every", type=int, help="evaluate every N steps (default 0: only at the end)")
    p.add_argument("--log-every", type=int, help="log loss terms every N steps (default 50)")
    p.add_argument("--checkpoint-every", type=int, help="save resumable state every N steps (default 0: at the end)")
    p.add_argument("--student-ema", type=float, help="keep a moving average of the student's weights with this decay (e.g. 0.999) and deliver it (default 0: off)")
    p.add_argument("--samples", type=int, help="synthesized images kept for plots (default 512)")
    p.add_argument("--bn-prior", dest="bn_priors", action="append", metavar="CHECKPOINT",
                   help="deepinversion/fast: another trained model of the same images whose BatchNorm statistics "
                        "the synthesized images must match too (repeatable; e.g. a zoo member of another architecture)")
    for flag, (_, kind, text) in METHOD_FLAGS.items():
        name = "--" + flag.replace("_", "-")
        if kind is bool:
            p.add_argument(name, action="store_true", help=text)
        else:
            p.add_argument(name, type=kind, help=text + " (default: the method's)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfkd", description="Data-free and multi-teacher knowledge distillation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def common(p, config=True):
        p.add_argument("--quiet", action="store_true", help="no progress bars (for scripts)")
        if config:
            p.add_argument("--config", help="YAML file of options (see configs/); flags and key=value override it")
            p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. steps=200 options.lr=0.1")

    p = sub.add_parser("train-teacher", help="train a teacher with labels on a real data set", formatter_class=_formatter)
    p.add_argument("--dataset", help=f"data set (default {TRAIN_DEFAULTS['dataset']}); see dfkd.data.list_datasets()")
    p.add_argument("--arch", help=f"architecture (default {TRAIN_DEFAULTS['arch']}); tv:<name> for torchvision models")
    p.add_argument("--classes", help="train on a subset of classes, e.g. 0-4 or 0,2,5 (default: all)")
    p.add_argument("--epochs", type=int, help=f"epochs (default {TRAIN_DEFAULTS['epochs']})")
    p.add_argument("--batch-size", type=int, help=f"batch size (default {TRAIN_DEFAULTS['batch_size']})")
    p.add_argument("--optimizer", choices=["adam", "sgd"], help="optimizer (default: the architecture's recipe)")
    p.add_argument("--lr", type=float, help="learning rate (default: the architecture's recipe)")
    p.add_argument("--weight-decay", type=float, help="weight decay (default: the architecture's recipe)")
    p.add_argument("--augment", choices=["crop", "crop_flip", "none"], help="augmentation (default crop)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, mps (default auto)")
    p.add_argument("--data-root", help="directory with the data set's files")
    p.add_argument("--download", action="store_true", help="download the data set through torchvision if missing")
    p.add_argument("--image-size", type=int, help="resize images to this side (default: the data set's)")
    p.add_argument("--out", help="where to write the checkpoint (.pt)")
    common(p)
    p.set_defaults(func=cmd_train_teacher)

    p = sub.add_parser("distill", help="data-free distillation of a teacher into a student", formatter_class=_formatter)
    p.add_argument("--teacher", help="teacher checkpoint (.pt)")
    p.add_argument("--method", help="dafl, deepinversion, zskt, dfad, fast, ... (default dafl)")
    p.add_argument("--student", help="student architecture (default lenet5_half)")
    p.add_argument("--eval-dataset", help="data set for evaluation (default: the teacher's)")
    add_run_arguments(p)
    common(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("evaluate", help="accuracy of a checkpoint on a real test split", formatter_class=_formatter)
    p.add_argument("--model", required=True, help="checkpoint (.pt)")
    p.add_argument("--dataset", help="data set (default: the checkpoint's)")
    p.add_argument("--data-root", help="directory with the data set's files")
    p.add_argument("--download", action="store_true", help="download the data set if missing")
    p.add_argument("--device", default="auto", help="device")
    p.add_argument("--json", help="also write the result as JSON here")
    common(p, config=False)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("import-weights", help="turn a plain state_dict file into a dfkd checkpoint", formatter_class=_formatter)
    p.add_argument("src", help="plain state_dict file (.pt/.pth), loaded with weights_only=True")
    p.add_argument("--arch", required=True, help="architecture the weights belong to")
    p.add_argument("--dataset", required=True, help="data set the model was trained on")
    p.add_argument("--classes", help="the class subset it was trained on (default: all)")
    p.add_argument("--image-size", type=int, help="input size (default: the data set's)")
    p.add_argument("--out", required=True, help="checkpoint to write")
    common(p, config=False)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("zoo", help="build, verify and list teacher zoo manifests", formatter_class=_formatter)
    zsub = p.add_subparsers(dest="zoo_command", metavar="ACTION", required=True)
    zb = zsub.add_parser("build", help="manifest of every checkpoint in a directory")
    zb.add_argument("directory")
    zb.add_argument("--out", required=True, help="manifest to write (zoo.yaml)")
    zv = zsub.add_parser("verify", help="check every entry's sha256 and that it loads")
    zv.add_argument("manifest")
    zl = zsub.add_parser("list", help="table of name, arch, dataset, classes, params, accuracy")
    zl.add_argument("manifest")
    common(p, config=False)
    p.set_defaults(func=cmd_zoo)

    p = sub.add_parser("plot", help="(re)draw a run's plots", formatter_class=_formatter)
    p.add_argument("kind", choices=["samples", "curves", "classes", "embedding", "confusion", "all"])
    p.add_argument("run_dir")
    p.add_argument("--embedding", default="pca", choices=["pca", "tsne"], help="2-D embedding method")
    common(p, config=False)
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("demo", help="digits: train a teacher, distill data-free, report", formatter_class=_formatter)
    p.add_argument("--out", default="runs/demo", help="where the demo writes")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", default="auto", help="device")
    common(p, config=False)
    p.set_defaults(func=cmd_demo)

    _register_extensions(sub, common)
    return parser


def _register_extensions(sub, common) -> None:
    """Subcommands that live in their own modules (amalgamation)."""
    try:
        from dfkd.amalgamate_cli import add_amalgamate_parser
    except ImportError:
        return
    add_amalgamate_parser(sub, common, _formatter)


def main(argv=None) -> int:
    parser = build_parser()
    # key=value overrides may come anywhere, also between options (argparse alone stops
    # collecting positionals at the first option after them)
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if item.startswith("-") or "=" not in item]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = list(args.overrides or []) + extra
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return args.func(args)
    except (CLIError, ConfigError) as exc:
        print(f"dfkd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; resume with --resume RUN_DIR", file=sys.stderr)
        return 130
    except ValueError as exc:  # the package's own user-facing errors derive from ValueError
        if os.environ.get("DFKD_DEBUG"):
            raise
        print(f"dfkd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from dfkd.engine import DistillationError

        if isinstance(exc, DistillationError) and not os.environ.get("DFKD_DEBUG"):
            print(f"dfkd {args.command}: error: {exc}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())

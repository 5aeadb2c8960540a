"""What every subcommand shares: the one-line error, printing, flags that become a config
layer, and the options of distillation-style commands."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dfkd.config import load_yaml, parse_overrides


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def say(args, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(text, flush=True)


def sayer(args):
    """``say`` bound to ``args`` (what the API calls for progress lines)."""
    return lambda text: say(args, text)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default only where it has one: most options default to ``None`` (the config
    file or the method's recipe decides) and say their effective default in their help."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def formatter(prog):
    return _HelpFormatter(prog, max_help_position=34)


def command_line() -> str:
    return "dfkd " + " ".join(sys.argv[1:])


def given(args, keys) -> dict:
    """The flags the user gave, as a config layer. A flag not given is ``None`` (so that 0,
    0.0 and false given explicitly are kept: they are values, not absences)."""
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


# convenience flags that map onto method options (name on the command line -> option key)
METHOD_FLAGS = {
    "adi": ("adi", bool, "DeepInversion: add ADI's competition term against the student"),
    "temperature": ("temperature", float, "KD temperature of the student loss"),
    "generator_lr": ("generator_lr", float, "generator learning rate (DAFL/ZSKT/DFAD)"),
    "bn_weight": ("bn_weight", float, "weight of the BatchNorm-statistics term (0 drops it)"),
    "iterations": ("iterations", int, "DeepInversion: optimisation steps per synthesized batch"),
}


def run_layers(args, keys) -> list[dict]:
    """The config layers of a run command: ``--config`` file < flags < ``key=value``."""
    flags = given(args, keys)
    flags["options"] = {key: getattr(args, flag) for flag, (key, _, _) in METHOD_FLAGS.items()
                        if getattr(args, flag, None) is not None}
    file_layer = load_yaml(args.config) if getattr(args, "config", None) else {}
    return [file_layer, flags, parse_overrides(getattr(args, "overrides", None))]


def check_resume_alone(args, keys) -> dict:
    """``--resume RUN_DIR`` continues a run with its own config.yaml: refuse the settings given
    with it that would change the run; return those that may change
    (:data:`dfkd.engine.rundir.RESUME_FREE_KEYS`: device, data root, how often to log and save)."""
    from dfkd.engine.rundir import RESUME_FREE_KEYS

    flags = given(args, keys)
    free = {k: v for k, v in flags.items() if k in RESUME_FREE_KEYS and k != "out"}
    ignored = [f"--{k.replace('_', '-')}" for k in sorted(flags) if k not in free]
    ignored += [f"--{flag.replace('_', '-')}" for flag in METHOD_FLAGS if getattr(args, flag, None) is not None]
    ignored += list(getattr(args, "overrides", None) or [])
    if getattr(args, "config", None):
        ignored.append("--config")
    if getattr(args, "overwrite", False):
        ignored.append("--overwrite")
    for flag in ("combine_opt", "synthesis_opt"):
        if getattr(args, flag, None):
            ignored.append("--" + flag.replace("_", "-"))
    if ignored:
        raise CLIError(f"--resume {args.resume} continues the run with its own config.yaml, so {', '.join(ignored)} "
                       "cannot apply; drop them (a new run can change settings; --device, --data-root, --log-every "
                       "and --checkpoint-* may be given)")
    return free


def add_common(p, config: bool = True) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars (for scripts)")
    if config:
        p.add_argument("--config", help="YAML file of options (see configs/); flags and key=value override it")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. steps=200 options.lr=0.1")


def add_run_arguments(p) -> None:
    """Options every distillation-style command shares (distill, amalgamate)."""
    p.add_argument("--steps", type=int, help="student optimisation steps (default 1000)")
    p.add_argument("--batch-size", type=int, help="images per student step (default: the method's)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--peers", type=int, help="deep mutual learning: a cohort of K networks, the student and K-1 peers "
                                             "that learn from each other (default 1: off)")
    p.add_argument("--peer-arch", help="the peers' architecture (default: the student's)")
    p.add_argument("--peer-weight", type=float, help="weight of each network's mutual term (default 1.0)")
    p.add_argument("--device", help="auto, cpu, cuda, mps (default auto)")
    p.add_argument("--out", help="run directory")
    p.add_argument("--data-root", help="directory with the data set's files")
    p.add_argument("--download", action="store_true", default=None, help="download the data set if missing")
    p.add_argument("--no-eval", action="store_true", default=None, help="skip evaluation on real test data")
    p.add_argument("--eval-every", type=int, help="evaluate every N steps (default 0: only at the end)")
    p.add_argument("--log-every", type=int, help="log loss terms every N steps (default 50)")
    p.add_argument("--checkpoint-every", type=int, help="also save resumable state every N steps (default 0: by time only)")
    p.add_argument("--checkpoint-seconds", type=float, help="save resumable state at most this many seconds apart, at "
                                                            "round ends (default 300; 0: only at the end and on Ctrl-C)")
    p.add_argument("--student-ema", type=float, help="keep a moving average of the student's weights with this decay "
                                                     "(e.g. 0.999) and deliver it (default 0: off)")
    p.add_argument("--samples", type=int, help="synthesized images kept for plots (default 512)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="mixed precision of forward passes (default auto: bf16 on CUDA, fp32 elsewhere; fp16 scales "
                        "the student's gradients)")
    p.add_argument("--knowledge", action="append", metavar="NAME[:WEIGHT][:KEY=VALUE,...]",
                   help="add a form of knowledge to the student's loss (rkd, sp, pkt, cc, fsp, nst, ft, vid, crd, dkd, "
                        "pkd, ckd, alp_kd, rail_kd) at WEIGHT (default: its paper's) with the loss's options, e.g. "
                        "crd:0.8:num_negatives=1024; repeatable")
    p.add_argument("--channels-last", action="store_true", default=None,
                   help="keep the student's weights and activations channels-last (faster convolutions on GPUs)")
    p.add_argument("--transfer-set", metavar="DIR", help="--method real: distill from this folder of unlabeled images "
                                                           "or .npy shards, streamed from disk (dfkd.data.folder)")
    p.add_argument("--student-optimizer", choices=["adam", "sgd"], help="the student's optimizer (default: the method's)")
    p.add_argument("--student-lr", type=float, help="the student's learning rate (default: the method's)")
    p.add_argument("--student-weight-decay", type=float, help="the student's weight decay (default: the method's)")
    p.add_argument("--student-schedule", choices=["cosine", "step", "constant"],
                   help="the student's learning-rate schedule (default: the method's)")
    p.add_argument("--bn-prior", dest="bn_priors", action="append", metavar="CHECKPOINT",
                   help="deepinversion/fast: another trained model of the same images whose BatchNorm statistics "
                        "the synthesized images must match too (repeatable; e.g. a zoo member of another architecture)")
    for flag, (_, kind, text) in METHOD_FLAGS.items():
        name = "--" + flag.replace("_", "-")
        if kind is bool:
            p.add_argument(name, action="store_true", default=None, help=text)
        else:
            p.add_argument(name, type=kind, help=text + " (default: the method's)")
    p.add_argument("--resume", metavar="RUN_DIR", help="complete a killed or interrupted run from its last saved state "
                                                       "(with the run's own config.yaml)")
    p.add_argument("--overwrite", action="store_true", help="replace the run (finished or not) in --out")


def print_summary(summary: dict, out) -> None:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.2f}%"

    print(f"method {summary['method']}: student {pct(summary.get('student_accuracy'))}, "
          f"teacher {pct(summary.get('teacher_accuracy'))}, agreement {pct(summary.get('agreement'))}, "
          f"{summary['steps']} steps, {summary['wall_seconds']:.1f}s, {summary['images_synthesized']} images synthesized")
    print(f"run directory: {out}  (report: {Path(out) / 'report.md'}, samples: {Path(out) / 'samples.png'})")


def print_peers(summary: dict) -> None:
    """The peers' accuracies of a deep-mutual-learning run (``summary.json``'s ``peers``)."""
    if summary.get("peers"):
        listed = ", ".join(f"{row['name']} {100 * row['accuracy']:.2f}%" for row in summary["peers"])
        print(f"peers: {listed}; cohort (mean probability) {100 * summary['cohort_accuracy']:.2f}%")

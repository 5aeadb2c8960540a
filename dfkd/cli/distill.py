"""``dfkd distill``: data-free distillation of one teacher checkpoint."""
from __future__ import annotations

from dfkd.api import DistillConfig, distill
from dfkd.cli.common import (
    add_common,
    add_run_arguments,
    check_resume_alone,
    command_line,
    formatter,
    print_peers,
    print_summary,
    run_layers,
    sayer,
)


def add_parser(sub) -> None:
    p = sub.add_parser("distill", help="data-free distillation of a teacher into a student", formatter_class=formatter)
    add_distill_arguments(p)
    add_common(p)
    p.set_defaults(func=run)


def add_distill_arguments(p) -> None:
    """The flags of a distillation from one teacher (``distill``, ``born-again``)."""
    p.add_argument("--teacher", help="teacher checkpoint (.pt)")
    p.add_argument("--method", help="dafl, deepinversion, zskt, dfad, fast, ... (default dafl)")
    p.add_argument("--student", help="student architecture (default lenet5_half)")
    p.add_argument("--eval-dataset", help="data set for evaluation (default: the teacher's)")
    add_run_arguments(p)


def config_from_args(args) -> DistillConfig:
    keys = [k for k in DistillConfig.defaults() if k != "options"]
    return DistillConfig.from_layers(*run_layers(args, keys))


def run(args) -> int:
    if args.resume:
        free = check_resume_alone(args, [k for k in DistillConfig.defaults() if k != "options"])
        result = distill(resume=args.resume, **free, progress=not args.quiet, command=command_line(), say=sayer(args))
    else:
        result = distill(config_from_args(args), overwrite=args.overwrite, progress=not args.quiet,
                         command=command_line(), say=sayer(args))
    print_summary(result.summary, result.run_dir)
    print_peers(result.summary)
    return 0


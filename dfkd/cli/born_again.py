"""``dfkd born-again``: generations of students, each taught by the last one or by the ensemble
of all before it (:func:`dfkd.born_again`)."""
from __future__ import annotations

from dfkd.api import DistillConfig, born_again
from dfkd.cli.common import add_common, check_resume_alone, command_line, formatter, sayer
from dfkd.cli.distill import add_distill_arguments, config_from_args


def add_parser(sub) -> None:
    p = sub.add_parser("born-again", formatter_class=formatter,
                       help="born-again networks: generations of students of one architecture, reported as their ensemble")
    add_distill_arguments(p)
    p.add_argument("--generations", type=int, help="number of generations, written to OUT/gen1 ... OUT/genN (default 2)")
    p.add_argument("--teacher-of-next", choices=["last", "ensemble"],
                   help="what teaches generation k > 1: the previous generation's student (the paper's chain) or the "
                        "ensemble of all earlier generations (default last)")
    p.add_argument("--ensemble-combine", help="the combiner that averages generations into an ensemble (default mean_prob)")
    add_common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    common = {"generations": args.generations, "teacher_of_next": args.teacher_of_next,
              "combine": args.ensemble_combine, "progress": not args.quiet, "command": command_line(),
              "say": sayer(args)}
    if args.resume:
        free = check_resume_alone(args, [k for k in DistillConfig.defaults() if k != "options"])
        result = born_again(resume=args.resume, **free, **common)
    else:
        result = born_again(config_from_args(args), overwrite=args.overwrite, **common)

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.2f}%"

    for row in result.record["generations"]:
        print(f"generation {row['generation']}: student {pct(row['student_accuracy'])}, ensemble of generations "
              f"1-{row['generation']} {pct(row.get('ensemble_accuracy'))}  ({result.out / row['run_dir']})")
    print(f"born-again ensemble ({result.record['combine']}): {pct(result.ensemble_accuracy)}, teacher "
          f"{pct(result.record['teacher_accuracy'])}; record: {result.out / 'born_again.json'}")
    return 0

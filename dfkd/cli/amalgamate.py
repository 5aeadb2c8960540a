"""``dfkd amalgamate``: distill a whole teacher zoo into one student over the union of classes.

::

    dfkd amalgamate --zoo zoo.yaml --student lenet5_half --method deepinversion \\
        --combine entropy_weighted [--combine-opt tau=0.5] \\
        [--features cfl --layers relu3:digits_a.relu3,relu3:digits_b.relu3] \\
        --steps 1000 --out runs/amal

    dfkd amalgamate --zoo zoo.yaml --method fast --synthesis per-member \\
        [--synthesis-opt origin_prior=0.9 --synthesis-opt cache_targets=true] --out runs/amal
"""
from __future__ import annotations

from dfkd.api import AmalgamateConfig, amalgamate
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
from dfkd.config import ConfigError, parse_value


def add_parser(sub) -> None:
    """Add the ``amalgamate`` subcommand to the ``dfkd`` parser."""
    p = sub.add_parser("amalgamate", help="distill a teacher zoo (ensemble / knowledge amalgamation) into one student",
                       formatter_class=formatter,
                       description="Distill a whole teacher zoo into one student over the union of its classes: the "
                                   "teachers become one ensemble that drives the synthesizer; the student learns the "
                                   "merged logits (--combine) and optionally their features (--features, --layers). "
                                   "Writes the run directory of dfkd distill, with per-teacher accuracy in summary.json.")
    p.add_argument("--zoo", help="zoo manifest (zoo.yaml, see dfkd zoo build)")
    p.add_argument("--student", help="student architecture (default lenet5_half)")
    p.add_argument("--method", help="dafl, deepinversion, zskt, dfad, fast, real (default dafl)")
    p.add_argument("--combine", help="logit combiner: auto, calibrated_concat, group_share, mean_prob, mean_logits, weighted, "
                                     "entropy_weighted, least_ambiguous, noisy, pate, concat, uhc "
                                     "(dfkd.multi.combine.list_combiners(); default auto: calibrated_concat for disjoint "
                                     "class sets, uhc for overlapping ones that connect every member)")
    p.add_argument("--combine-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="combiner option, repeatable (e.g. tau=0.5, weights=[1,2], sigma=0.1, epsilon=1)")
    p.add_argument("--synthesis", choices=["auto", "per-member", "shared"],
                   help="per-member: each member inverts its own BN statistics and classes, each image keeps its "
                        "origin (fast, deepinversion); shared: the zoo drives one synthesizer (default auto: "
                        "per-member where it applies)")
    p.add_argument("--synthesis-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="per-member setting, repeatable: origin_prior, negative_weight, cross_member, balance, "
                        "cache_targets (dfkd.multi.per_member)")
    p.add_argument("--features", help="feature amalgamation: cfl, layerwise_ae, hint or attention (default: none)")
    p.add_argument("--layers", help="layer pairs student_path:member.path,... (default: last blocks)")
    p.add_argument("--feature-weight", type=float, help="weight of the feature terms (default 1)")
    p.add_argument("--student-loss", choices=["combiner", "method"],
                   help="combiner: KD/UHC against the merged target; method: the method's own loss (default combiner)")
    p.add_argument("--dataset", help="data set of the real images (--method real) and of evaluation (default: the zoo's)")
    p.add_argument("--real-limit", type=int, help="--method real: use at most this many training images (default 0: all)")
    p.add_argument("--allow-mixed", action="store_true", default=None,
                   help="merge teachers of different data sets/image shapes")
    p.add_argument("--member-devices", metavar="DEV[,DEV...]",
                   help="keep the members on these devices, member i on the (i mod n)-th (e.g. cuda:0,cuda:1), for a "
                        "zoo that does not fit on one; the student, generators and banks stay on --device")
    add_run_arguments(p)
    add_common(p)
    p.set_defaults(func=run)


def amalgamate_config(args) -> AmalgamateConfig:
    """Defaults < --config file < flags < key=value overrides; ``--combine-opt`` flags win
    over the file's ``combine_options`` key by key."""
    keys = [k for k in AmalgamateConfig.defaults() if k not in ("options", "combine_options", "synthesis_options")]
    file_layer, flags, overrides = run_layers(args, keys)
    for flag, key in (("combine_opt", "combine_options"), ("synthesis_opt", "synthesis_options")):
        given = {}
        for item in getattr(args, flag, None) or []:
            if "=" not in item:
                raise ConfigError(f"--{flag.replace('_', '-')} {item!r} is not of the form key=value")
            name, text = item.split("=", 1)
            given[name.strip()] = parse_value(text)
        if given:
            flags[key] = {**(file_layer.get(key) or {}), **given}
    return AmalgamateConfig.from_layers(file_layer, flags, overrides)


def run(args) -> int:
    if args.resume:
        free = check_resume_alone(args, [k for k in AmalgamateConfig.defaults() if k != "options"])
        result = amalgamate(resume=args.resume, **free, progress=not args.quiet, command=command_line(), say=sayer(args))
    else:
        result = amalgamate(amalgamate_config(args), overwrite=args.overwrite, progress=not args.quiet,
                            command=command_line(), say=sayer(args))
    summary = result.summary
    print_summary(summary, result.run_dir)
    print_peers(summary)
    for row in summary.get("teachers", []):
        if "accuracy" in row:
            print(f"  teacher {row['name']}: {100 * row['accuracy']:.2f}% on its {len(row['classes'])} classes; "
                  f"student {100 * row['student_accuracy_on_classes']:.2f}% on the same images")
    return 0

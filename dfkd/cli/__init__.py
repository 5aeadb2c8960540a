"""The ``dfkd`` command line, a thin layer over the Python API (:mod:`dfkd.api`).

``dfkd train-teacher | distill | amalgamate | evaluate | plot | zoo | import-weights | demo``.
Every subcommand's ``--help`` lists its options with their defaults. Commands that run
jobs accept ``--config FILE.yaml`` and trailing ``key=value`` overrides. Each subcommand
lives in its own module with an ``add_parser`` (or ``add_parsers``) and a ``run(args)``.
"""
from __future__ import annotations

import argparse
import os
import sys

from dfkd.cli import amalgamate, demo, distill, plot, teacher, zoo
from dfkd.cli.common import CLIError
from dfkd.engine.run import DistillationError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfkd", description="Data-free and multi-teacher knowledge distillation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    teacher.add_parsers(sub)
    distill.add_parser(sub)
    amalgamate.add_parser(sub)
    zoo.add_parser(sub)
    plot.add_parser(sub)
    demo.add_parser(sub)
    return parser


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
    debug = bool(os.environ.get("DFKD_DEBUG"))
    try:
        return args.func(args)
    except CLIError as exc:
        print(f"dfkd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; resume with --resume RUN_DIR", file=sys.stderr)
        return 130
    except ValueError as exc:  # the package's own user-facing errors derive from ValueError
        if debug:
            raise
        print(f"dfkd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except DistillationError as exc:
        if debug:
            raise
        print(f"dfkd {args.command}: error: {exc}", file=sys.stderr)
        return 3

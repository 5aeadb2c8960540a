"""The ``dfkd`` command line, a thin layer over the Python API (:mod:`dfkd.api`).

``dfkd train-teacher | distill | born-again | amalgamate | synthesize | evaluate | plot | zoo | import-weights | demo``.
Every subcommand's ``--help`` lists its options with their defaults. Commands that run
jobs accept ``--config FILE.yaml`` and trailing ``key=value`` overrides. Each subcommand
lives in its own module with an ``add_parser`` (or ``add_parsers``) and a ``run(args)``.

Errors are one line on stderr, never a traceback (``DFKD_DEBUG=1`` shows it): exit 2 for
what the user can fix (bad flags or configs, untrusted files, a full or read-only disk, a
directory in use), 3 for a run that had to stop (a non-finite loss), 130 for Ctrl-C (the
message names the ``--resume`` command), 1 for a bug.
"""
from __future__ import annotations

import argparse
import os
import sys

from dfkd.cli import amalgamate, born_again, demo, distill, plot, synthesize, teacher, zoo
from dfkd.cli.common import CLIError
from dfkd.engine.distributed import launched_by_torchrun
from dfkd.engine.run import DistillationError, RunInterrupted
from teachers.files import FileWriteError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfkd", description="Data-free and multi-teacher knowledge distillation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    teacher.add_parsers(sub)
    distill.add_parser(sub)
    born_again.add_parser(sub)
    amalgamate.add_parser(sub)
    synthesize.add_parser(sub)
    zoo.add_parser(sub)
    plot.add_parser(sub)
    demo.add_parser(sub)
    return parser


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (a multi-line message's lines joined with "; ")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(lines) or type(exc).__name__


def _os_error(exc: OSError) -> str:
    if isinstance(exc, FileWriteError):
        return one_line(exc)
    where = exc.filename if exc.filename is not None else ""
    what = exc.strerror or one_line(exc)
    return (f"{where}: " if where else "") + f"{what}; check the path, its permissions and the disk, then retry"


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
    if launched_by_torchrun() and int(os.environ["RANK"]) > 0:  # rank 0 speaks for the run; errors still show
        sys.stdout = open(os.devnull, "w")
    prefix = f"dfkd {args.command}: error:"
    try:
        return args.func(args)
    except CLIError as exc:
        print(f"{prefix} {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        if debug:
            raise
        if isinstance(exc, RunInterrupted):
            print(f"interrupted; resume with dfkd {args.command} --resume {exc.run_dir}", file=sys.stderr)
        else:
            print("interrupted", file=sys.stderr)
        return 130
    except DistillationError as exc:  # the run stopped (non-finite loss, unusable state)
        if debug:
            raise
        print(f"{prefix} {one_line(exc)}", file=sys.stderr)
        return 3
    except ValueError as exc:  # the package's own user-facing errors derive from ValueError
        if debug:
            raise
        print(f"{prefix} {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file that cannot be written (FileWriteError: disk full, read-only ...) or read
        if debug:
            raise
        print(f"{prefix} {_os_error(exc)}", file=sys.stderr)
        return 2
    except MemoryError:
        if debug:
            raise
        print(f"{prefix} out of memory; lower batch_size (or options.synthesis_batch_size)", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug: still one line; DFKD_DEBUG=1 shows the traceback
        if debug:
            raise
        if isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower():  # torch.OutOfMemoryError
            print(f"{prefix} out of memory on the device; lower batch_size (or options.synthesis_batch_size)",
                  file=sys.stderr)
            return 2
        print(f"{prefix} internal error: {type(exc).__name__}: {one_line(exc)[:500]} "
              "(rerun with DFKD_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1

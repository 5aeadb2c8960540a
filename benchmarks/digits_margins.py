"""How far above its floor each digits test case lands, over several seeds.

The cases and floors of ``tests/test_methods_digits.py`` are run with the student and
synthesizer seeded 0..N-1 (the test itself uses seed 0). A different machine changes the
floating-point order much as a different seed does, so a floor should sit well below every
seed's result here. Usage (one thread, as the tests run)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/digits_margins.py --methods deepinversion dfad --seeds 0 1 2 3
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from test_methods_digits import CASES, run_case, train_digits_teacher  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2, 3])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    teacher, test, info, accuracy = train_digits_teacher()
    print(f"teacher test accuracy {accuracy:.4f}")
    for method in args.methods:
        floor = CASES[method][2]
        results = []
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as run_dir:
                summary = run_case(method, teacher, test, info, run_dir, seed=seed)
            results.append(summary["student_accuracy"])
            print(f"{method} seed {seed}: {summary['student_accuracy']:.3f} ({summary['wall_seconds']:.0f} s)", flush=True)
        print(f"{method}: min {min(results):.3f}, floor {floor}, margin {min(results) - floor:+.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

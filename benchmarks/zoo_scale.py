"""Amalgamating zoos of 2, 3, 5 and 10 members: accuracy and cost per step as the zoo grows.

Usage (from the repository root, on an otherwise idle machine; one CPU thread)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/zoo_scale.py --steps 500 --seeds 0 1 2 --json benchmarks/results/zoo_scale.json

Members are Fashion-MNIST teachers of mixed architectures (``lenet5_bn``, ``resnet8``,
``lenet5_half_bn`` in turn) trained on parts of the classes (:data:`ZOOS`): two disjoint halves,
three disjoint groups, five disjoint pairs, and ten pairs around a ring (each class shared by two
members, so the overlaps connect every class set). Each zoo is amalgamated into ``lenet5_half``
with the amalgamation recipe (``configs/fashion-mnist/amalgamate-fast.yaml``, Fast), the
defaults for the zoo (``--combine auto``, ``--synthesis auto``) and ``--steps`` student steps;
the wall time per student step includes every member's synthesis. Records are merged into ``--json``
by (zoo size, seed), and the table gives each size's mean ± std over the seeds on record and its
fastest time per step (the run least slowed by others on the machine). Measured, never asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "runs" / "zoo_scale"
ARCHS = ("lenet5_bn", "resnet8", "lenet5_half_bn")
#: zoo size -> the members' class sets
ZOOS = {
    2: ["0-4", "5-9"],
    3: ["0-3", "4-6", "7-9"],
    5: ["0,1", "2,3", "4,5", "6,7", "8,9"],
    10: [f"{k},{(k + 1) % 10}" for k in range(10)],
}
EPOCHS = {"lenet5_bn": 5, "resnet8": 3, "lenet5_half_bn": 5}


def dfkd(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "dfkd", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"dfkd {' '.join(map(str, args))} failed:\n{proc.stderr[-2000:]}")
    return proc


def build_zoo(size: int) -> Path:
    """Train the zoo's members (once) and write its manifest."""
    folder = WORK / f"zoo{size}"
    folder.mkdir(parents=True, exist_ok=True)
    for i, classes in enumerate(ZOOS[size]):
        arch = ARCHS[i % len(ARCHS)]
        path = folder / f"{arch}_{classes.replace(',', '+')}.pt"
        if not path.is_file():
            dfkd("train-teacher", "--dataset", "fashion-mnist", "--arch", arch, "--classes", classes,
                 "--epochs", EPOCHS[arch], "--seed", i, "--quiet", "--out", path)
    manifest = WORK / f"zoo{size}.yaml"
    dfkd("zoo", "build", folder, "--out", manifest)
    return manifest


def amalgamate(size: int, steps: int, seed: int) -> dict:
    manifest = build_zoo(size)
    out = WORK / f"run{size}-seed{seed}"
    command = ["amalgamate", "--zoo", manifest.relative_to(ROOT), "--student", "lenet5_half", "--quiet",
               "--config", "configs/fashion-mnist/amalgamate-fast.yaml", "--dataset", "fashion-mnist",
               "--steps", steps, "--seed", seed, "--out", out.relative_to(ROOT), "--overwrite", "eval_every=0"]
    dfkd(*command)
    summary = json.loads((out / "summary.json").read_text())
    return {"members": size, "classes": ZOOS[size], "seed": seed, "steps": summary["steps"],
            "combine": summary.get("combine"), "synthesis": summary.get("synthesis"),
            "student_accuracy": summary["student_accuracy"], "wall_seconds": summary["wall_seconds"],
            "seconds_per_step": round(summary["wall_seconds"] / summary["steps"], 4),
            "images_synthesized": summary["images_synthesized"],
            "ensemble_accuracy": summary.get("ensemble_accuracy"),
            "ensemble_accuracy_calibrated": summary.get("ensemble_accuracy_calibrated"),
            "member_accuracy": {m["name"]: m["accuracy"] for m in summary.get("teachers", [])},
            "command": "dfkd " + " ".join(map(str, command))}


def mean_std(values) -> str:
    """``mean ± std`` in percent (the sample std over the seeds, as benchmarks/RESULTS.md gives it), or
    the one value."""
    values = [100 * v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(records: list[dict]) -> str:
    """One Markdown row per zoo size, over the seeds on record (also a section of benchmarks/RESULTS.md)."""
    lines = ["| members | class sets | combine / synthesis | ensemble before / after calibration | student % | "
             "s per step | seeds |", "|---|---|---|---|---|---|---|"]
    for size in sorted({r["members"] for r in records}):
        rows = [r for r in records if r["members"] == size]
        first = rows[0]
        lines.append(f"| {size} | {' '.join(first['classes'])} | {first['combine']} / {first['synthesis']} | "
                     f"{mean_std(r['ensemble_accuracy'] for r in rows)} / "
                     f"{mean_std(r.get('ensemble_accuracy_calibrated') for r in rows)} | "
                     f"{mean_std(r['student_accuracy'] for r in rows)} | "
                     f"{min(r['seconds_per_step'] for r in rows):.3f} | {','.join(str(r['seed']) for r in rows)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", type=int, default=list(ZOOS))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--json", type=Path, help="write the records here")
    args = parser.parse_args(argv)
    records = json.loads(args.json.read_text()) if args.json and args.json.is_file() else []
    for size in args.sizes:
        for seed in args.seeds:
            record = amalgamate(size, args.steps, seed)
            records = [r for r in records if (r["members"], r["seed"]) != (size, seed)] + [record]
            records.sort(key=lambda r: (r["members"], r["seed"]))
            print(f"{size} members (seed {seed}): {record['student_accuracy']:.2%}, {record['seconds_per_step']} s/step, "
                  f"{record['combine']} / {record['synthesis']}", flush=True)
            if args.json:
                args.json.write_text(json.dumps(records, indent=1) + "\n")
    print("\n" + table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())

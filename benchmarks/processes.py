"""Throughput of one and of several processes (``torchrun``) for ``fast`` and ``deepinversion``.

Usage (from the repository root, on an otherwise idle machine)::

    .venv/bin/python benchmarks/processes.py --processes 1 2 --json benchmarks/results/processes_cpu.json

Each case is a short ``dfkd distill`` of the Fashion-MNIST benchmark teacher with the method's
CPU budget recipe (``configs/fashion-mnist/bench-<method>.yaml``), without evaluation, one CPU
thread per process, the same global batch whatever the number of processes (each rank
synthesizes and trains on its share). Images synthesized per second and student steps per
second come from the run's own ``summary.json`` (the training loop's wall time, not the start-up),
so the speed-up is what the loop gains. Measured, never asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEACHER = "benchmarks/teachers/fm_lenet5_bn_seed0.pt"
#: method -> (recipe, student steps timed): a few synthesis rounds of each
CASES = {"fast": ("configs/fashion-mnist/bench-fast.yaml", 300),
         "deepinversion": ("configs/fashion-mnist/bench-deepinversion.yaml", 120)}


def run(method: str, processes: int, out: Path) -> dict:
    recipe, steps = CASES[method]
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
              if processes > 1 else [sys.executable])
    command = [*launch, "-m", "dfkd", "distill", "--teacher", TEACHER, "--config", recipe, "--no-eval", "--quiet",
               "--samples", "16", "--out", str(out.relative_to(ROOT)), "--overwrite", f"steps={steps}", "eval_every=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{method} with {processes} process(es) failed:\n{proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    wall = float(summary["wall_seconds"])
    return {"method": method, "processes": processes, "steps": summary["steps"],
            "images_synthesized": summary["images_synthesized"], "wall_seconds": wall,
            "images_per_second": round(summary["images_synthesized"] / wall, 2),
            "student_steps_per_second": round(summary["steps"] / wall, 3),
            "command": (f"torchrun --standalone --nproc_per_node={processes} -m dfkd " if processes > 1 else "dfkd ")
            + " ".join(command[command.index("dfkd") + 1:])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", nargs="*", type=int, default=[1, 2])
    parser.add_argument("--methods", nargs="*", default=list(CASES))
    parser.add_argument("--json", type=Path, help="write the records here")
    args = parser.parse_args(argv)
    records = []
    for method in args.methods:
        for n in args.processes:
            record = run(method, n, ROOT / "benchmarks" / "runs" / "processes" / f"{method}-{n}")
            records.append(record)
            print(f"{method} x{n}: {record['images_per_second']} images/s, {record['student_steps_per_second']} "
                  f"student steps/s ({record['wall_seconds']:.1f} s)", flush=True)
    print("\n| method | processes | images/s | student steps/s | speed-up |\n|---|---|---|---|---|")
    for r in records:
        base = next(b for b in records if b["method"] == r["method"] and b["processes"] == min(args.processes))
        print(f"| {r['method']} | {r['processes']} | {r['images_per_second']} | {r['student_steps_per_second']} | "
              f"{r['images_per_second'] / base['images_per_second']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

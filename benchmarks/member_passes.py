"""Members of one architecture: separate passes against one stacked pass (dfkd.multi.batched).

Usage (from the repository root)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/member_passes.py --json benchmarks/results/member_passes_cpu.json
    .venv/bin/python benchmarks/member_passes.py --device cuda --images 1024 --json benchmarks/results/member_passes_cuda.json

An ensemble of ``--members`` randomly initialised members of one architecture on class pairs (the
cost of a pass does not depend on the weights) relabels ``--images`` 32 px grey images without
gradient, as a student step of amalgamation does; the median of ``--repeats`` timed passes after
one warm-up, with ``batch_members`` False (one pass per member) and True (one stacked pass).
Measured, never asserted.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the package, not benchmarks/teachers/

from dfkd.multi.ensemble import TeacherEnsemble  # noqa: E402
from teachers import build_model, freeze  # noqa: E402


def zoo(arch: str, members: int, device: torch.device) -> TeacherEnsemble:
    entries = []
    for i in range(members):
        torch.manual_seed(i)
        model = build_model(arch, 2, 1, 32, (0.3,), (0.35,))
        meta = {"classes": [2 * i, 2 * i + 1], "image_shape": [1, 32, 32], "mean": [0.3], "std": [0.35]}
        entries.append((f"{arch}_{i}", freeze(model), meta))
    return TeacherEnsemble(entries, combine="calibrated_concat").to(device)


def seconds_per_pass(ensemble: TeacherEnsemble, images: torch.Tensor, repeats: int) -> float:
    times = []
    with torch.no_grad():
        ensemble.forward_all(images)  # warm-up (and the stacked weights, once)
        for _ in range(repeats):
            if images.device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            ensemble.forward_all(images)
            if images.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--archs", nargs="+", default=["lenet5_bn", "resnet8"])
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    images = torch.rand(args.images, 1, 32, 32, device=device)
    rows = []
    for arch in args.archs:
        ensemble = zoo(arch, args.members, device)
        row = {"arch": arch, "members": args.members, "images": args.images, "device": str(device),
               "threads": torch.get_num_threads()}
        for batched in (False, True):
            ensemble.batch_members = batched
            row["stacked_s" if batched else "separate_s"] = round(seconds_per_pass(ensemble, images, args.repeats), 4)
        row["speedup"] = round(row["separate_s"] / row["stacked_s"], 2)
        rows.append(row)
        print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps({"command": "benchmarks/member_passes.py", "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Throughput of each method's hot loops: synthesis rounds and student steps.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/speed.py [--teacher PATH.pt] [--rounds 3] [--json OUT]

For every method, with its Fashion-MNIST benchmark recipe (``configs/fashion-mnist/bench-*.yaml``)
and a LeNet-5-BN teacher (a given checkpoint, or a randomly initialised one; throughput does
not depend on the weights), it times a few synthesis rounds and student steps and prints
images synthesized per second and student steps per second. Measured, never asserted.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dfkd.config import load_yaml  # noqa: E402
from dfkd.engine.optim import StudentOptim  # noqa: E402
from generators import create_synthesizer  # noqa: E402
from teachers import build_model, freeze, load_checkpoint  # noqa: E402
from teachers.device import resolve_device  # noqa: E402

RECIPES = {
    "dafl": "bench-dafl.yaml",
    "deepinversion": "bench-deepinversion.yaml",
    "deepinversion-adi": "bench-deepinversion-adi.yaml",
    "zskt": "bench-zskt.yaml",
    "dfad": "bench-dfad.yaml",
    "fast": "bench-fast.yaml",
    "best": "best.yaml",
}


def measure(method_file: str, teacher, device, rounds: int) -> dict:
    cfg = load_yaml(ROOT / "configs" / "fashion-mnist" / method_file)
    student = build_model(cfg["student"], 10, 1, 32, (0.2854,), (0.3384,)).to(device)
    synth = create_synthesizer(cfg["method"], teacher, image_shape=(1, 32, 32), num_classes=10, device=device,
                               **cfg["options"])
    synth.attach_student(student)
    optimizer = StudentOptim.resolve(synth.student_recipe, cfg).build(student.parameters())

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    synth.synthesize(student)  # warm-up
    sync()
    before = synth.images_synthesized
    started = time.perf_counter()
    for _ in range(rounds):
        synth.synthesize(student)
    sync()
    synth_seconds = time.perf_counter() - started
    synthesized = synth.images_synthesized - before

    steps = max(5, min(50, synth.student_steps_per_round * rounds))
    started = time.perf_counter()
    for _ in range(steps):
        losses, _, _ = synth.student_losses(student, synth.sample())
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
    sync()
    step_seconds = time.perf_counter() - started
    return {"synthesis_images_per_second": round(synthesized / synth_seconds, 1),
            "synthesis_round_seconds": round(synth_seconds / rounds, 3),
            "student_steps_per_second": round(steps / step_seconds, 2),
            "student_batch": synth.batch_size}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", help="lenet5_bn checkpoint (default: random weights)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--methods", nargs="*", default=list(RECIPES))
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    if args.teacher:
        teacher, _ = load_checkpoint(args.teacher)
    else:
        teacher = build_model("lenet5_bn", 10, 1, 32, (0.2854,), (0.3384,))
    teacher = freeze(teacher.to(device))
    results = {}
    for name in args.methods:
        results[name] = measure(RECIPES[name], teacher, device, args.rounds)
        print(name, results[name], flush=True)
    results["_machine"] = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

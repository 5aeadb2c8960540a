"""How synthesis and student steps cost grows with the image size and the teacher, for
``fast`` and ``deepinversion`` with stock torchvision teachers (random weights: throughput does
not depend on them).

Usage (from the repository root)::

    # image size on the CPU, one thread: tv:resnet18 at 32, 64, 128 and 224 px
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scaling.py --sizes 32 64 128 224 --json OUT.json
    # the GPU figures: ResNet-34 at 32 px and ResNet-50 at 224 px, bf16
    .venv/bin/python benchmarks/scaling.py --gpu --json OUT.json

Each case times ``--rounds`` synthesis rounds (after one warm-up round) and a few student
steps, and prints images synthesized per second and student steps per second. Measured,
never asserted. DeepInversion runs ``--iterations`` optimisation steps per batch (the paper's
2,000 would time the same loop longer).
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

from dfkd.engine.optim import StudentOptim  # noqa: E402
from generators import create_synthesizer  # noqa: E402
from teachers import build_model, freeze  # noqa: E402
from teachers.device import resolve_device  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GPU_CASES = (("tv:resnet34", 32, 256), ("tv:resnet50", 224, 64))


def options(method: str, batch: int, iterations: int) -> dict:
    if method == "fast":
        return {"ngf": 64, "synthesis_batch_size": batch, "batch_size": batch, "warmup_rounds": 0,
                "student_steps_per_round": 5}
    return {"iterations": iterations, "synthesis_batch_size": batch, "batch_size": batch, "student_steps_per_round": 5}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(method: str, arch: str, size: int, batch: int, device, rounds: int, iterations: int,
            precision: str) -> dict:
    torch.manual_seed(0)
    teacher = freeze(build_model(arch, 1000 if size >= 128 else 10, 3, size, MEAN, STD).to(device))
    student = build_model("tv:resnet18", 1000 if size >= 128 else 10, 3, size, MEAN, STD).to(device)
    classes = 1000 if size >= 128 else 10
    synth = create_synthesizer(method, teacher, image_shape=(3, size, size), num_classes=classes, device=device,
                               precision=precision, **options(method, batch, iterations))
    synth.attach_student(student)
    synth.plan(rounds * synth.student_steps_per_round)
    optimizer = StudentOptim.resolve(synth.student_recipe, {}).build(student.parameters())
    synth.synthesize(student)  # warm-up
    sync(device)
    before, started = synth.images_synthesized, time.perf_counter()
    for _ in range(rounds):
        synth.synthesize(student)
    sync(device)
    synth_seconds = time.perf_counter() - started
    steps = 5
    started = time.perf_counter()
    for _ in range(steps):
        losses, _, _ = synth.student_losses(student, synth.sample())
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
    sync(device)
    step_seconds = time.perf_counter() - started
    return {"method": method, "teacher": arch, "image_size": size, "batch": batch, "precision": precision,
            "images_per_second": round((synth.images_synthesized - before) / synth_seconds, 2),
            "round_seconds": round(synth_seconds / rounds, 3),
            "student_steps_per_second": round(steps / step_seconds, 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[32, 64, 128, 224])
    parser.add_argument("--teacher", default="tv:resnet18")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--methods", nargs="*", default=["fast", "deepinversion"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=5, help="DeepInversion steps per batch")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--gpu", action="store_true", help="the GPU cases: ResNet-34 at 32 px, ResNet-50 at 224 px")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    cases = GPU_CASES if args.gpu else tuple((args.teacher, size, args.batch) for size in args.sizes)
    results = []
    for method in args.methods:
        for arch, size, batch in cases:
            row = measure(method, arch, size, batch, device, args.rounds, args.iterations, args.precision)
            results.append(row)
            print(json.dumps(row), flush=True)
    machine = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__}
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "machine": machine}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a teacher looks like from the outside: the properties that might make it easy or hard to invert.

Usage (from the repository root; a few seconds per teacher on one CPU thread)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/teacher_properties.py benchmarks/teachers/fm_lenet5_*.pt \\
        --json benchmarks/results/teacher_properties.json

For each Fashion-MNIST teacher checkpoint, on 2,000 test images and 1,000 images of uniform noise
(pixels in [0, 1], what the teacher's normalisation expects):

- ``test_accuracy``, ``confidence_test`` (mean max softmax) and ``logit_norm_test`` (mean l2 norm);
- ``confidence_noise`` and ``noise_classes``: the mean max softmax on noise, and how many classes
  are the arg max of at least 1% of the noise images (a teacher that calls all noise one class
  gives a generator one place to start from);
- ``input_gradient``: the mean l2 norm of the gradient of the log-probability of the true class
  with respect to the test image (how sharply the teacher's output turns with its input);
- ``ascent_reached`` and ``ascent_steps``: 10 noise images per class are pushed by Adam (lr 0.01,
  pixels clamped to [0, 1]) on the cross-entropy to their class for at most 100 steps; the fraction
  whose class probability passes 0.99, and the mean number of steps they needed: how far a confident
  image of each class is from noise by the input gradient, the path every inversion method walks.

Measured, never asserted: docs/experiments.md ("What makes a teacher invertible") reads these
beside each method's accuracy with the same teachers.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dfkd.data import open_dataset  # noqa: E402
from teachers import load_teacher  # noqa: E402


def ascent(model, num_classes: int, per_class: int = 10, steps: int = 100, threshold: float = 0.99,
           shape=(1, 32, 32), lr: float = 0.01) -> tuple[float, float]:
    """(fraction of noise images whose target probability passes ``threshold`` within ``steps``
    Adam steps on the cross-entropy to the target, mean steps those images needed)."""
    targets = torch.arange(num_classes).repeat_interleave(per_class)
    images = torch.rand(len(targets), *shape, requires_grad=True)
    optimizer = torch.optim.Adam([images], lr=lr)
    reached_at = torch.full((len(targets),), -1)
    for step in range(1, steps + 1):
        logits = model(images)
        prob = logits.softmax(1).gather(1, targets[:, None]).squeeze(1)
        newly = (prob > threshold) & (reached_at < 0)
        reached_at[newly] = step - 1
        if bool((reached_at >= 0).all()):
            break
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(logits, targets).backward()
        optimizer.step()
        with torch.no_grad():
            images.clamp_(0, 1)
    done = reached_at >= 0
    return float(done.float().mean()), float(reached_at[done].float().mean()) if bool(done.any()) else float("nan")


@torch.no_grad()
def output_statistics(model, images: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """(the arg max per image, mean max softmax, mean logit l2 norm)."""
    logits = torch.cat([model(batch) for batch in images.split(500)])
    return logits.argmax(1), float(logits.softmax(1).amax(1).mean()), float(logits.norm(dim=1).mean())


def input_gradient(model, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean l2 norm of d log p(label | x) / dx over the images."""
    x = images[:500].clone().requires_grad_(True)
    log_prob = model(x).log_softmax(1).gather(1, labels[:500, None]).sum()
    (grad,) = torch.autograd.grad(log_prob, x)
    return float(grad.flatten(1).norm(dim=1).mean())


def properties(path: Path, test: tuple[torch.Tensor, torch.Tensor]) -> dict:
    torch.manual_seed(0)
    model, meta = load_teacher(path)
    model.eval()
    images, labels = test
    predicted, confidence, norm = output_statistics(model, images)
    noise_predicted, noise_confidence, _ = output_statistics(model, torch.rand(1000, *images.shape[1:]))
    num_classes = int(meta.get("num_classes", 10))
    share = torch.bincount(noise_predicted, minlength=num_classes).float() / len(noise_predicted)
    sharpness = input_gradient(model, images, labels)
    reached, steps = ascent(model, num_classes, shape=tuple(images.shape[1:]))
    return {"teacher": path.relative_to(ROOT).as_posix() if path.resolve().is_relative_to(ROOT) else path.name,
            "arch": meta.get("arch"), "test_accuracy": float((predicted == labels).float().mean()),
            "confidence_test": confidence, "logit_norm_test": norm, "confidence_noise": noise_confidence,
            "noise_classes": int((share >= 0.01).sum()), "input_gradient": sharpness, "ascent_reached": reached, "ascent_steps": steps}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teachers", nargs="+", type=Path, help="Fashion-MNIST teacher checkpoints")
    parser.add_argument("--json", type=Path, help="write the records here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    split = open_dataset("fashion-mnist", "test", image_size=32)
    first = torch.utils.data.Subset(split, range(2000))
    images, labels = map(torch.cat, zip(*torch.utils.data.DataLoader(first, batch_size=500)))
    records = [properties(path.resolve(), (images, labels)) for path in args.teachers]
    print("| teacher | test acc | confidence (test) | logit norm | confidence (noise) | classes of noise | "
          "input gradient | ascent reached | ascent steps |\n|---|---|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| {Path(r['teacher']).name} | {r['test_accuracy']:.2%} | {r['confidence_test']:.3f} | "
              f"{r['logit_norm_test']:.1f} | {r['confidence_noise']:.3f} | {r['noise_classes']} | "
              f"{r['input_gradient']:.2f} | {r['ascent_reached']:.0%} | {r['ascent_steps']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

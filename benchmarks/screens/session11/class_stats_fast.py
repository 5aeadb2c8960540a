"""Session-11 screen: Fast with *class-conditional* BatchNorm statistics of the teacher.

The teacher's BN running statistics describe the whole training set, not a class, and the
session-8/9 diagnostics put the missing accuracy in modes inside classes. This screen asks
what per-class statistics would give, in the setting of Lopes et al. 2017 ("Data-Free
Knowledge Distillation for Deep Neural Networks"): the teacher's owner records activation
metadata at training time and ships it with the weights; the student side sees no image.

``collect TEACHER OUT``: per class ``k`` and BN layer ``l`` of TEACHER, the mean ``mu_kl`` and
biased variance ``s2_kl`` (per channel, over the class's images and positions) of the
layer's input on the real Fashion-MNIST training images. A few KB.

``distill ARGS``: ``dfkd distill ARGS`` with a synthesizer ``fast_cc`` registered: Fast plus
the term (weight ``cc_weight``; ``options.class_stats=OUT``)::

    L_cc = sum_l mean_{k in batch} ||mu~_kl(x[y = k]) - mu_kl||_2 + ||s2~_kl(x[y = k]) - s2_kl||_2

with ``y`` the batch's random one-hot targets and ``~`` Fast's momentum (``bn_momentum``) over
rounds, per class. Not in the package. Usage (repo root):
PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/screens/session11/class_stats_fast.py collect TEACHER STATS.pt
PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/screens/session11/class_stats_fast.py distill --quiet --teacher TEACHER --student lenet5_half --config configs/fashion-mnist/best.yaml --method fast_cc --seed K --out DIR options.class_stats=STATS.pt
"""
import sys

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.hooks import FeatureTap, inner_network
from generators.base import register_synthesizer
from generators.fast import Fast


def bn_input_tap(model: nn.Module) -> FeatureTap:
    """A tap on the inputs of every BatchNorm layer of ``model``, in module order."""
    paths = [name for name, m in inner_network(model).named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return FeatureTap(model, paths, capture="input")


def blend(new: torch.Tensor, average: torch.Tensor, momentum: float) -> torch.Tensor:
    """Fast's momentum over rounds: ``(1 - m) new + m average``."""
    return (1 - momentum) * new + momentum * average


def class_sums(features: torch.Tensor, onehot: torch.Tensor):
    """Per-class channel sums and sums of squares of ``features`` (N x C [x H x W]) over the
    samples whose ``onehot`` (N x K) row marks the class, and the count of values behind each
    (K x C, K x C, K)."""
    f = features.float()
    positions = f[0, 0].numel() if f.dim() > 2 else 1
    flat = f.flatten(2) if f.dim() > 2 else f.unsqueeze(2)
    return onehot.t() @ flat.sum(2), onehot.t() @ (flat * flat).sum(2), onehot.sum(0) * positions


def moments(sums: torch.Tensor, squares: torch.Tensor, counts: torch.Tensor):
    """Mean and biased variance from :func:`class_sums` (classes without values get 0)."""
    safe = counts.clamp_min(1.0).unsqueeze(1)
    mean = sums / safe
    return mean, (squares / safe - mean * mean).clamp_min(0.0)


def collect(teacher_path: str, out: str) -> None:
    from dfkd.data import load_dataset
    from teachers.checkpoint import load_checkpoint

    model, _ = load_checkpoint(teacher_path)
    model.eval()
    data = load_dataset("fashion-mnist", split="train")
    tap = bn_input_tap(model)
    totals = [None] * len(tap.paths)
    with torch.no_grad():
        for x, y in data.batches(1000):
            model(x)
            onehot = F.one_hot(y, data.info.num_classes).float()
            for i, path in enumerate(tap.paths):
                part = class_sums(tap[path], onehot)
                totals[i] = part if totals[i] is None else tuple(a + b for a, b in zip(totals[i], part))
    tap.close()
    layers = dict(inner_network(model).named_modules())
    means, variances = [], []
    for i, path in enumerate(tap.paths):
        layer = layers[path]
        mean, var = moments(*totals[i])
        means.append(mean)
        variances.append(var)
        counts = totals[i][2].unsqueeze(1)
        pooled_mean = (mean * counts).sum(0) / counts.sum()
        print(f"layer {i} ({layer.num_features} ch): |pooled mean - running mean| = "
              f"{(pooled_mean - layer.running_mean).norm():.3f} (|running mean| {layer.running_mean.norm():.3f}); "
              f"between-class spread of means {mean.std(0).norm():.3f}")
    torch.save({"means": means, "variances": variances, "teacher": teacher_path}, out)
    print(f"wrote {out}")


@register_synthesizer("fast_cc")
class FastClassStats(Fast):
    """Fast + the class-conditional BN statistics term ``L_cc`` (module docstring)."""

    defaults = {**Fast.defaults, "class_stats": "", "cc_weight": 10.0}

    def __init__(self, teacher, image_shape, num_classes, device="cpu", seed=0, **options):
        super().__init__(teacher, image_shape, num_classes, device, seed, **options)
        stats = torch.load(self.options["class_stats"], weights_only=True, map_location=self.device)
        self.cc_tap = bn_input_tap(teacher)  # the last teacher forward of inversion_terms is the inversion's
        if len(stats["means"]) != len(self.cc_tap.paths):
            raise SystemExit("class_stats: another teacher's statistics (layer count differs)")
        self.cc_targets = [(m.float(), v.float()) for m, v in zip(stats["means"], stats["variances"])]
        self.cc_averages: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.cc_last: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def inversion_terms(self, images, targets, student, adversarial, masks=None):
        terms = super().inversion_terms(images, targets, student, adversarial, masks)
        onehot = F.one_hot(targets, self.num_classes).float()
        m = self.options["bn_momentum"]
        total = 0.0
        for i, (path, (target_mean, target_var)) in enumerate(zip(self.cc_tap.paths, self.cc_targets)):
            sums, squares, counts = class_sums(self.cc_tap[path], onehot)
            mean, var = moments(sums, squares, counts)
            present = (counts > 0).float()
            self.cc_last[i] = (mean.detach(), var.detach(), present)
            if i in self.cc_averages:
                avg_mean, avg_var = self.cc_averages[i]
                mean, var = blend(mean, avg_mean, m), blend(var, avg_var, m)
            per_class = (mean - target_mean).norm(dim=1) + (var - target_var).norm(dim=1)
            total = total + (per_class * present).sum() / present.sum().clamp_min(1.0)
        terms["cc"] = total
        return terms

    def weighted_total(self, terms):
        rest = {name: value for name, value in terms.items() if name != "cc"}
        return super().weighted_total(rest) + self.options["cc_weight"] * terms["cc"]

    def synthesis_round(self, student, adversarial):
        result = super().synthesis_round(student, adversarial)
        m = self.options["bn_momentum"]
        for i, (mean, var, present) in self.cc_last.items():
            if i not in self.cc_averages:
                self.cc_averages[i] = (mean, var)
            else:  # classes absent from the last batch keep their average
                keep = present.unsqueeze(1) > 0
                self.cc_averages[i] = tuple(torch.where(keep, blend(new, avg, m), avg)
                                            for new, avg in zip((mean, var), self.cc_averages[i]))
        return result


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "collect":
        collect(sys.argv[2], sys.argv[3])
    elif len(sys.argv) >= 2 and sys.argv[1] == "distill":
        from dfkd.cli import main

        sys.exit(main(sys.argv[1:]))
    else:
        raise SystemExit(__doc__)

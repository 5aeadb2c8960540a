"""Post-run analysis: what the synthesized images look like to the teacher, and plots of it.

:func:`analyze_run` runs the teacher over synthesized (and optionally real) images, computes
the sample-quality metrics of :mod:`dfkd.reporting.quality` from its logits and penultimate features,
and writes the figures of :mod:`dfkd.reporting.plots` into the run directory.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dfkd.core.taps import penultimate_tap
from dfkd.reporting import plots
from dfkd.reporting.quality import sample_quality, sure_teacher_agreement
from teachers.device import batched_logits

#: At most this many images of each set (synthetic, real) go through the teacher.
MAX_IMAGES = 2000
#: Images per forward pass.
BATCH_SIZE = 500


def _subset(images: torch.Tensor, labels, limit: int = MAX_IMAGES, seed: int = 0):
    """At most ``limit`` images (and their labels), a seeded random subset in original order."""
    if images.shape[0] <= limit:
        return images, labels
    generator = torch.Generator().manual_seed(seed)
    keep = torch.randperm(images.shape[0], generator=generator)[:limit].sort().values
    return images[keep], (None if labels is None else labels[keep])


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, tap, images: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's logits and flattened penultimate features on ``images``, on the CPU."""
    logits, features = [], []
    for start in range(0, images.shape[0], BATCH_SIZE):
        batch = images[start : start + BATCH_SIZE].to(device).float()
        logits.append(teacher(batch).float().cpu())
        features.append(tap[tap.paths[0]].flatten(1).float().cpu())
    return torch.cat(logits), torch.cat(features)


def model_logits(model: nn.Module, images: torch.Tensor, device) -> torch.Tensor:
    """Logits of ``model`` on ``images`` in batches, float32 on the CPU."""
    return batched_logits(model, images, device, BATCH_SIZE)


def predict_labels(model: nn.Module, images: torch.Tensor, device) -> torch.Tensor:
    """Arg-max predictions of ``model`` on ``images`` in batches, on the CPU."""
    logits = model_logits(model, images, device)
    return logits.argmax(dim=1) if logits.numel() else torch.zeros(0, dtype=torch.long)


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) counts: row = true class, column = predicted class (K grows to fit any label)."""
    if labels.numel():
        num_classes = max(num_classes, int(labels.max()) + 1, int(predictions.max()) + 1)
    index = labels.long() * num_classes + predictions.long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


@torch.no_grad()
def analyze_run(run_dir, teacher: nn.Module, student: nn.Module, synthetic_images, real_images=None, real_labels=None, class_names=None, device="cpu", embedding: str = "pca") -> dict:
    """Quality metrics and figures of a run's synthesized images, written into ``run_dir``.

    The teacher (eval mode) sees at most 2000 synthetic and 2000 real images (seeded random
    subsets, batches of 500); its logits and penultimate features (``penultimate_tap``) give
    :func:`dfkd.reporting.quality.sample_quality`. Written: ``samples.png`` and ``classes.png``; with
    real images also ``embedding.png`` (``embedding`` = ``"pca"`` or ``"tsne"``) and
    ``confusion.png`` (the student on all given real images); ``curves.png`` when
    ``metrics.csv`` exists. Models must already be on ``device``; the teacher is left in eval
    mode, the student's train/eval mode is restored afterwards. Returns the quality dict plus ``plots``, the file names
    written, and, with real images, ``sure_teacher``: the student's agreement with the teacher on
    all real images split by the teacher's confidence (:func:`dfkd.reporting.quality.sure_teacher_agreement`).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    synthetic_images = torch.as_tensor(synthetic_images).detach()
    with_real = real_images is not None and real_labels is not None
    if with_real:
        real_images, real_labels = torch.as_tensor(real_images).detach(), torch.as_tensor(real_labels).detach().cpu().long()

    student_mode = student.training
    teacher.eval()  # a teacher stays in eval mode (frozen); only the student's mode is restored
    student.eval()
    tap = penultimate_tap(teacher)
    try:
        synth, _ = _subset(synthetic_images, None)
        synth_logits, synth_features = teacher_outputs(teacher, tap, synth, device)
        real = real_y = real_features = None
        if with_real:
            real, real_y = _subset(real_images, real_labels)
            _, real_features = teacher_outputs(teacher, tap, real, device)
            student_predictions = predict_labels(student, real_images, device)
    finally:
        tap.close()
        student.train(student_mode)

    num_classes = synth_logits.shape[1]
    names = list(class_names) if class_names else [str(k) for k in range(num_classes)]
    synth_predictions = synth_logits.argmax(dim=1)
    result = sample_quality(synth_logits, synth_features, real_features)
    if with_real:  # on every real image, after the tap is gone (it only feeds the 2000-image subset)
        result["sure_teacher"] = sure_teacher_agreement(model_logits(teacher, real_images, device), student_predictions)

    written = [
        plots.plot_samples(synth, synth_logits, names, run_dir / "samples.png", real_images=real, real_labels=real_y),
        plots.plot_class_histogram(synth_predictions, names, run_dir / "classes.png"),
    ]
    if with_real:
        written.append(plots.plot_embedding(real_features, real_y, synth_features, synth_predictions, names, run_dir / "embedding.png", method=embedding))
        confusion = confusion_matrix(student_predictions, real_labels, num_classes)
        written.append(plots.plot_confusion(confusion, names, run_dir / "confusion.png"))
    if (run_dir / "metrics.csv").exists():
        written.append(plots.plot_curves(run_dir / "metrics.csv", run_dir / "curves.png"))
    result["plots"] = [path.name for path in written]
    return result

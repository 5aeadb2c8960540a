"""Sample-quality metrics for synthesized images, as pure functions on tensors.

All functions accept torch tensors (any device, any float dtype) or array-likes and return
plain Python floats, so their results go straight into ``summary.json``. They are computed
on the *teacher's* view of the images: its logits and its penultimate features.

- :func:`class_balance`   how evenly the teacher's predicted classes are spread;
- :func:`mean_confidence` how sure the teacher is about the synthesized images;
- :func:`diversity`       how spread out the images are in feature space;
- :func:`frechet_distance` how far the synthesized feature distribution is from the real one
  (FID computed on the teacher's features instead of Inception's).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch


def _as_tensor(values, dtype=None) -> torch.Tensor:
    tensor = values.detach() if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values))
    tensor = tensor.cpu()
    return tensor.to(dtype) if dtype is not None else tensor


def _as_matrix(features) -> np.ndarray:
    """(N, ...) features as an (N, D) float64 numpy array."""
    array = _as_tensor(features, torch.float64).numpy()
    return array.reshape(array.shape[0], -1)


def class_balance(predictions, num_classes: int) -> float:
    """Normalised entropy of the predicted-class histogram.

    With ``p_k = count_k / N`` over the ``num_classes`` classes,
    ``balance = -sum_k p_k ln p_k / ln(num_classes)`` (terms with ``p_k = 0`` count 0).
    1.0 means every class is predicted equally often, 0.0 that a single class is predicted.
    With ``num_classes == 1`` the balance is 1.0 by definition.
    """
    predictions = _as_tensor(predictions, torch.long).flatten()
    if predictions.numel() == 0:
        raise ValueError("class_balance needs at least one prediction")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, not {num_classes}")
    if int(predictions.min()) < 0 or int(predictions.max()) >= num_classes:
        raise ValueError(f"predictions must lie in [0, {num_classes}); got [{int(predictions.min())}, {int(predictions.max())}]")
    if num_classes == 1:
        return 1.0
    counts = torch.bincount(predictions, minlength=num_classes).double()
    p = counts[counts > 0] / counts.sum()
    entropy = float(-(p * p.log()).sum())
    return entropy / math.log(num_classes)


def mean_confidence(logits) -> float:
    """Mean over samples of the largest softmax probability: ``mean_i max_k softmax(z_i)_k``."""
    logits = _as_tensor(logits, torch.float64)
    if logits.dim() != 2 or logits.shape[0] == 0:
        raise ValueError(f"mean_confidence needs (N, K) logits with N >= 1, got shape {tuple(logits.shape)}")
    return float(logits.softmax(dim=1).max(dim=1).values.mean())


def diversity(features, chunk_size: int = 1024) -> float:
    """Mean pairwise Euclidean distance between feature vectors over ordered pairs ``i != j``.

    ``diversity = sum_{i != j} ||f_i - f_j||_2 / (N (N - 1))``; features are flattened per
    sample. Distances are computed ``chunk_size`` rows at a time in float64, so 5k vectors
    never build more than a ``chunk_size x N`` matrix. Fewer than two vectors give 0.0.
    """
    feats = _as_tensor(features, torch.float64)
    feats = feats.reshape(feats.shape[0], -1)
    n = feats.shape[0]
    if n < 2:
        return 0.0
    total = 0.0
    for start in range(0, n, chunk_size):
        block = feats[start : start + chunk_size]
        distances = torch.cdist(block, feats, compute_mode="use_mm_for_euclid_dist")
        rows = torch.arange(block.shape[0])
        distances[rows, rows + start] = 0.0  # i == j: exactly zero, not matmul round-off
        total += float(distances.sum())
    return total / (n * (n - 1))


def frechet_distance(features_a, features_b, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula).

    ``d^2 = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b))`` with sample means ``mu``
    and unbiased sample covariances ``S`` (``np.cov``), computed in float64 with
    :func:`scipy.linalg.sqrtm`. As in the FID reference code, when the product is singular
    (the square root is not finite) ``eps * I`` is added to both covariances, and a
    numerically imaginary part of the square root is discarded. Each set needs >= 2 vectors.
    """
    from scipy import linalg

    a, b = _as_matrix(features_a), _as_matrix(features_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("frechet_distance needs at least two feature vectors in each set")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    sigma_a = np.atleast_2d(np.cov(a, rowvar=False))
    sigma_b = np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():  # a singular product is handled just below
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(sigma_a @ sigma_b)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma_a.shape[0]) * eps
        covmean = linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    diff = mu_a - mu_b
    value = float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(covmean))
    return max(value, 0.0)  # the distance is non-negative; tiny negatives are round-off


def sample_quality(teacher_logits, teacher_features, real_features=None) -> dict:
    """All quality metrics for one set of synthesized images, from the teacher's view.

    ``class_balance`` of the teacher's arg-max predictions over ``K = logits.shape[1]``
    classes, ``mean_confidence`` of its logits, ``diversity`` of its penultimate features and
    ``frechet_distance`` between those and the teacher's features of real images
    (``None`` when ``real_features`` is not given).
    """
    logits = _as_tensor(teacher_logits, torch.float64)
    return {
        "class_balance": class_balance(logits.argmax(dim=1), logits.shape[1]),
        "mean_confidence": mean_confidence(logits),
        "diversity": diversity(teacher_features),
        "frechet_distance": None if real_features is None else frechet_distance(teacher_features, real_features),
    }


def sure_teacher_agreement(teacher_logits, student_predictions, threshold: float = 0.9, top: int = 5) -> dict:
    """Where the student parts from a teacher that is sure: on real images.

    Splits the images by the teacher's confidence ``max softmax >= threshold`` and returns
    ``threshold``; ``sure_fraction`` (share of images the teacher is sure of);
    ``sure_agreement`` and ``unsure_agreement`` (student-teacher arg-max agreement on each
    part, ``None`` for an empty part); ``misses``: the ``top`` most frequent
    (teacher class, student class) pairs among the sure images the student gets wrong, each
    ``{"teacher": t, "student": s, "count": n, "of": sure images of class t}``.

    A data-free student that misses images its teacher is sure of has not seen those modes
    of the data (on Fashion-MNIST: real sandals called sneakers); one that only misses the
    unsure ones has learnt the data set and differs at its boundaries.
    """
    logits = _as_tensor(teacher_logits, torch.float64)
    predictions = _as_tensor(student_predictions, torch.long).flatten()
    if logits.dim() != 2 or logits.shape[0] != predictions.shape[0]:
        raise ValueError(f"sure_teacher_agreement: {tuple(logits.shape)} teacher logits for {predictions.shape[0]} predictions")
    confidence, teacher_classes = logits.softmax(dim=1).max(dim=1)
    sure = confidence >= threshold
    agree = teacher_classes == predictions

    def share(mask):
        return float(agree[mask].double().mean()) if bool(mask.any()) else None

    num_classes = max(logits.shape[1], int(predictions.max()) + 1 if predictions.numel() else 0)
    missed = sure & ~agree
    pairs = torch.bincount(teacher_classes[missed] * num_classes + predictions[missed], minlength=num_classes ** 2)
    sure_per_class = torch.bincount(teacher_classes[sure], minlength=num_classes)
    order = torch.argsort(pairs, descending=True, stable=True)[:top]
    misses = [{"teacher": int(i) // num_classes, "student": int(i) % num_classes, "count": int(pairs[i]),
               "of": int(sure_per_class[int(i) // num_classes])} for i in order if pairs[i] > 0]
    return {
        "threshold": float(threshold),
        "sure_fraction": float(sure.double().mean()) if sure.numel() else None,
        "sure_agreement": share(sure),
        "unsure_agreement": share(~sure),
        "misses": misses,
    }


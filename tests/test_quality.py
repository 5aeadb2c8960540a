"""Sample-quality metrics against hand computations on tiny inputs."""
import math

import numpy as np
import pytest
import torch

from dfkd.reporting.quality import (
    class_balance,
    diversity,
    frechet_distance,
    mean_confidence,
    sample_quality,
    sure_teacher_agreement,
)


def test_class_balance_uniform_single_and_known_histogram():
    assert class_balance(torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), 4) == pytest.approx(1.0)
    assert class_balance(torch.tensor([2, 2, 2]), 4) == pytest.approx(0.0)
    # histogram (2, 1, 1, 0) over 4 classes: p = (1/2, 1/4, 1/4, 0)
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)) / math.log(4)
    assert class_balance(torch.tensor([0, 0, 1, 2]), 4) == pytest.approx(expected)
    with pytest.raises(ValueError):
        class_balance(torch.tensor([0, 5]), 4)


def test_mean_confidence_known_logits():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0]])
    # max softmax: 1/2, 3/4, 1/2
    assert mean_confidence(logits) == pytest.approx((0.5 + 0.75 + 0.5) / 3)
    assert mean_confidence(torch.tensor([[100.0, 0.0, 0.0]])) == pytest.approx(1.0)


def test_diversity_three_points_and_chunking():
    points = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])  # distances 3, 4, 5
    assert diversity(points) == pytest.approx((3 + 4 + 5) / 3)
    assert diversity(points, chunk_size=1) == pytest.approx(4.0)
    assert diversity(points[:1]) == 0.0
    rng = torch.Generator().manual_seed(0)
    many = torch.randn(50, 6, generator=rng)
    assert diversity(many, chunk_size=7) == pytest.approx(torch.pdist(many.double()).mean().item(), rel=1e-9)


def _cross(a, b, shift):
    """Four points (+-a, 0), (0, +-b) around ``shift``: mean ``shift``, cov diag(2a^2/3, 2b^2/3)."""
    points = np.array([[a, 0.0], [-a, 0.0], [0.0, b], [0.0, -b]])
    return points + np.asarray(shift)


def test_frechet_distance_identical_sets_is_zero():
    feats = torch.randn(40, 5, generator=torch.Generator().manual_seed(1))
    assert frechet_distance(feats, feats.clone()) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_diagonal_gaussians_closed_form():
    a, b = _cross(1.0, 2.0, [0.0, 0.0]), _cross(3.0, 0.5, [1.0, -2.0])
    var_a = np.array([2 * 1.0**2 / 3, 2 * 2.0**2 / 3])
    var_b = np.array([2 * 3.0**2 / 3, 2 * 0.5**2 / 3])
    np.testing.assert_allclose(np.cov(a, rowvar=False), np.diag(var_a), atol=1e-12)
    # diagonal covariances: sqrtm(S_a S_b) = diag(sqrt(var_a * var_b))
    expected = (1.0**2 + 2.0**2) + np.sum(var_a + var_b - 2 * np.sqrt(var_a * var_b))
    assert frechet_distance(torch.tensor(a), torch.tensor(b)) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_singular_covariance_is_finite():
    # 3 samples in 8 dimensions: rank-deficient covariances need the eps * I fallback.
    gen = torch.Generator().manual_seed(2)
    value = frechet_distance(torch.randn(3, 8, generator=gen), torch.randn(3, 8, generator=gen))
    assert math.isfinite(value) and value > 0


def test_sample_quality_keys_and_values():
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0], [0.0, 5.0]])
    feats = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0], [3.0, 4.0]])
    result = sample_quality(logits, feats)
    assert set(result) == {"class_balance", "mean_confidence", "diversity", "frechet_distance"}
    assert result["class_balance"] == pytest.approx(1.0)
    assert result["frechet_distance"] is None
    assert result["diversity"] == pytest.approx(diversity(feats))
    assert sample_quality(logits, feats, real_features=feats)["frechet_distance"] == pytest.approx(0.0, abs=1e-6)


def test_sure_teacher_agreement_splits_by_confidence_and_counts_misses():
    sure, unsure = 8.0, 0.1  # softmax max ~0.999 vs ~0.36 over 3 classes
    logits = torch.tensor([
        [sure, 0, 0],       # teacher sure of 0, student 0: agree
        [sure, 0, 0],       # sure of 0, student 2: miss 0 -> 2
        [sure, 0, 0],       # sure of 0, student 2: miss 0 -> 2
        [0, sure, 0],       # sure of 1, student 0: miss 1 -> 0
        [0, sure, 0],       # sure of 1, student 1: agree
        [unsure, 0, 0],     # unsure (class 0), student 0: agree
        [0, 0, unsure],     # unsure (class 2), student 1: disagree
    ])
    student = torch.tensor([0, 2, 2, 0, 1, 0, 1])
    result = sure_teacher_agreement(logits, student, threshold=0.9, top=5)
    assert result["threshold"] == 0.9
    assert result["sure_fraction"] == pytest.approx(5 / 7)
    assert result["sure_agreement"] == pytest.approx(2 / 5)
    assert result["unsure_agreement"] == pytest.approx(1 / 2)
    assert result["misses"] == [{"teacher": 0, "student": 2, "count": 2, "of": 3},
                                {"teacher": 1, "student": 0, "count": 1, "of": 2}]
    assert sure_teacher_agreement(logits, student, top=1)["misses"] == [{"teacher": 0, "student": 2, "count": 2, "of": 3}]
    # nobody sure: the sure part is empty, not a division by zero
    none_sure = sure_teacher_agreement(logits[5:], student[5:])
    assert none_sure["sure_fraction"] == 0.0 and none_sure["sure_agreement"] is None and none_sure["misses"] == []
    with pytest.raises(ValueError, match="teacher logits for 6 predictions"):
        sure_teacher_agreement(logits, student[:6])

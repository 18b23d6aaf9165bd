"""Metric functions against cases whose answer is known in closed form."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg

from pipeline.data.mnist import load_split
from pipeline.evaluation.metrics import (
    class_shares,
    classifier_score,
    compare,
    coverage,
    frechet_distance,
    knn_radii,
    precision_recall,
)


def one_hot(labels: np.ndarray, num_classes: int = 10) -> np.ndarray:
    return np.eye(num_classes)[labels]


# --------------------------------------------------------------------------- classifier score


def test_score_of_one_class_is_one() -> None:
    assert classifier_score(one_hot(np.full(500, 3))) == pytest.approx(1.0)


def test_score_of_confident_balanced_samples_is_the_number_of_classes() -> None:
    assert classifier_score(one_hot(np.arange(1000) % 10)) == pytest.approx(10.0, rel=1e-6)


def test_score_of_unsure_classifier_is_one() -> None:
    assert classifier_score(np.full((200, 10), 0.1)) == pytest.approx(1.0)


def test_score_of_real_test_labels_is_exp_entropy_of_their_histogram(mnist_dir: Path) -> None:
    # A perfect classifier on the real test set: the score is exp(H(p(y))) exactly, just under
    # 10 because the digits are not perfectly balanced (980 zeros, 1135 ones, ...).
    _, labels = load_split(mnist_dir, "test")
    shares = np.bincount(labels) / len(labels)
    expected = np.exp(-np.sum(shares * np.log(shares)))
    assert classifier_score(one_hot(labels)) == pytest.approx(expected, rel=1e-6)
    assert 9.9 < expected < 10.0


# --------------------------------------------------------------------------- Fréchet distance


@pytest.fixture
def features() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.normal(size=(2000, 16)) @ rng.normal(size=(16, 16)) + rng.normal(size=16)


def test_frechet_of_identical_sets_is_zero(features: np.ndarray) -> None:
    assert frechet_distance(features, features.copy()) == pytest.approx(0.0, abs=1e-6)


def test_frechet_of_shifted_set_is_squared_shift(features: np.ndarray) -> None:
    shift = np.arange(16.0)
    assert frechet_distance(features, features + shift) == pytest.approx(np.sum(shift**2))


def test_frechet_of_scaled_set_has_closed_form(features: np.ndarray) -> None:
    # b = 2a: S_b = 4 S_a, (S_a S_b)^(1/2) = 2 S_a, so FID = |mu_a|^2 + Tr(S_a).
    expected = np.sum(features.mean(axis=0) ** 2) + np.trace(np.cov(features, rowvar=False))
    assert frechet_distance(features, 2 * features) == pytest.approx(expected, rel=1e-8)


def test_frechet_matches_the_matrix_square_root_formula(features: np.ndarray) -> None:
    other = np.random.default_rng(1).normal(size=(1500, 16)) * 1.5
    cov_a, cov_b = np.cov(features, rowvar=False), np.cov(other, rowvar=False)
    reference = np.sum((features.mean(axis=0) - other.mean(axis=0)) ** 2) + np.trace(
        cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real
    )
    assert frechet_distance(features, other) == pytest.approx(reference, rel=1e-8)


# --------------------------------------------------------------------------- mode coverage


def test_coverage_of_one_class() -> None:
    result = coverage(class_shares(np.full(300, 7)))
    assert result == pytest.approx(
        {"min_class_share": 0.0, "classes_present": 1, "class_kl": np.log(10)}
    )
    assert result["classes_present"] / 10 == 0.1


def test_coverage_of_balanced_classes() -> None:
    result = coverage(class_shares(np.arange(1000) % 10))
    assert result == pytest.approx({"min_class_share": 0.1, "classes_present": 10, "class_kl": 0})


def test_a_few_stray_samples_do_not_make_a_class_present() -> None:
    # 0.5% of the samples is below a tenth of the fair 10% share: noise, not a covered mode.
    labels = np.concatenate([np.arange(995) % 9, [9] * 5])
    result = coverage(class_shares(labels))
    assert result["classes_present"] == 9
    assert result["min_class_share"] == pytest.approx(0.005)


def test_class_kl_is_kl_from_uniform() -> None:
    shares = np.array([0.5, 0.5] + [0.0] * 8)
    assert coverage(shares)["class_kl"] == pytest.approx(np.log(5))


# --------------------------------------------------------------------------- precision/recall


def test_knn_radii_on_a_line() -> None:
    points = np.arange(10.0)[:, None]
    assert knn_radii(points, k=1, batch_size=3) == pytest.approx(np.ones(10))
    # Second-nearest: 2 away at the ends (squared 4), 1 away inside.
    assert knn_radii(points, k=2, batch_size=4) == pytest.approx([4] + [1] * 8 + [4])


def test_knn_k_must_leave_neighbours() -> None:
    with pytest.raises(ValueError, match=r"eval\.knn_k: got 5; must be in \[1, 4\]"):
        knn_radii(np.zeros((5, 2)), k=5, batch_size=10)


def test_precision_recall_of_identical_sets_is_one(features: np.ndarray) -> None:
    assert precision_recall(features, features.copy(), k=3, batch_size=256) == (1.0, 1.0)


def test_precision_recall_of_disjoint_sets_is_zero(features: np.ndarray) -> None:
    assert precision_recall(features, features + 1e3, k=3, batch_size=256) == (0.0, 0.0)


def test_mode_collapse_keeps_precision_and_halves_recall() -> None:
    rng = np.random.default_rng(2)
    real = np.concatenate([rng.normal(0, 1, (500, 4)), rng.normal(50, 1, (500, 4))])
    fake = rng.normal(0, 1, (1000, 4))  # only the first mode
    precision, recall = precision_recall(real, fake, k=3, batch_size=128)
    assert precision > 0.9  # the tails of the fake mode stick out of the 500 real balls
    assert 0.45 < recall < 0.52


def test_batch_size_does_not_change_the_answer(features: np.ndarray) -> None:
    other = np.random.default_rng(3).normal(size=(700, 16)) * 3
    results = {precision_recall(features, other, 3, batch) for batch in (7, 100, 5000)}
    assert len(results) == 1


def test_compare_reports_every_figure(features: np.ndarray) -> None:
    probs = one_hot(np.arange(len(features)) % 10)
    result = compare(features, probs, features, k=3, batch_size=500)
    assert result == pytest.approx(
        {
            "fid": 0,
            "classifier_score": 10,
            "precision": 1,
            "recall": 1,
            "min_class_share": 0.1,
            "classes_present": 10,
            "class_kl": 0,
        },
        abs=1e-6,
    )

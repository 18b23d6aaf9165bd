"""Numbers for a generator, all computed from what the pinned MNIST classifier sees (see
pipeline/evaluation/yardstick.py): pure NumPy/SciPy functions of features and class probabilities.

- classifier score: the Inception score with the MNIST classifier, exp E_x[KL(p(y|x) || p(y))].
  High when each sample is clearly one digit (sharp p(y|x)) and all digits occur (flat
  p(y)); 1 at worst, 10 (the number of classes) at best.
- Fréchet distance (FID) between Gaussians fitted to the feature sets; 0 for identical sets.
- mode coverage: the share of each digit among samples, the smallest share, how many digits
  occur, and the KL divergence of that histogram from uniform (0 = perfectly balanced,
  log 10 = 2.30 = a single digit).
- precision and recall (Kynkäänniemi et al. 2019): a sample is "realistic" if it falls inside
  the k-NN ball of some real image; a real image is "covered" if it falls inside the k-NN ball
  of some sample. Precision = share of realistic samples, recall = share of covered real
  images. Distances are computed a batch of rows at a time, so memory stays at
  batch_size x N, not N x N.
"""

from __future__ import annotations

import numpy as np

from pipeline.core.images import NUM_CLASSES

# A digit counts as present when it makes up at least a tenth of its fair share: a few stray
# samples the classifier happens to call a "1" are noise, not a mode the generator covers.
PRESENT_FRACTION_OF_UNIFORM = 0.1
_EPS = 1e-12


def classifier_score(probs: np.ndarray) -> float:
    """exp(mean KL(p(y|x) || p(y))) over the rows of ``probs`` [N, C]."""
    probs = np.asarray(probs, dtype=np.float64)
    marginal = probs.mean(axis=0, keepdims=True)
    kl = np.sum(probs * (np.log(probs + _EPS) - np.log(marginal + _EPS)), axis=1)
    return float(np.exp(kl.mean()))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between the feature sets [N, D]."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr((S_a S_b)^(1/2)) is the sum of the square roots of the eigenvalues of S_a S_b, which
    # are real and >= 0 for covariance matrices: no matrix square root (and none of its
    # complex round-off) needed. Clip the tiny negative ones round-off leaves.
    eigenvalues = np.linalg.eigvals(cov_a @ cov_b).real.clip(min=0)
    trace_sqrt = np.sqrt(eigenvalues).sum()
    distance = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt
    return float(max(distance, 0.0))


def class_shares(labels: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Share of each class among ``labels`` (ints in [0, num_classes)), summing to 1."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    return counts / max(counts.sum(), 1)


def coverage(shares: np.ndarray) -> dict[str, float]:
    """Smallest share, number of classes present, and KL(shares || uniform)."""
    shares = np.asarray(shares, dtype=np.float64)
    num_classes = len(shares)
    nonzero = shares[shares > 0]
    return {
        "min_class_share": float(shares.min()),
        "classes_present": int(np.sum(shares >= PRESENT_FRACTION_OF_UNIFORM / num_classes)),
        "class_kl": float(np.sum(nonzero * np.log(nonzero * num_classes))),
    }


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sq = np.sum(a**2, axis=1)[:, None] + np.sum(b**2, axis=1)[None, :] - 2.0 * a @ b.T
    return np.maximum(sq, 0.0)


def knn_radii(features: np.ndarray, k: int, batch_size: int) -> np.ndarray:
    """Squared distance from each row to its k-th nearest other row."""
    features = np.asarray(features, dtype=np.float64)
    if not 1 <= k < len(features):
        raise ValueError(f"eval.knn_k: got {k}; must be in [1, {len(features) - 1}] here")
    radii = np.empty(len(features))
    for start in range(0, len(features), batch_size):
        distances = _squared_distances(features[start : start + batch_size], features)
        # Index k, not k - 1: every row's nearest neighbour is itself at distance 0.
        radii[start : start + batch_size] = np.partition(distances, k, axis=1)[:, k]
    return radii


def inside_manifold(
    queries: np.ndarray, points: np.ndarray, radii: np.ndarray, batch_size: int
) -> np.ndarray:
    """Whether each query lies within the k-NN ball (squared ``radii``) of any point."""
    queries, points = np.asarray(queries, np.float64), np.asarray(points, np.float64)
    inside = np.empty(len(queries), dtype=bool)
    for start in range(0, len(queries), batch_size):
        distances = _squared_distances(queries[start : start + batch_size], points)
        inside[start : start + batch_size] = np.any(distances <= radii[None, :], axis=1)
    return inside


def precision_recall(
    real: np.ndarray, fake: np.ndarray, k: int, batch_size: int
) -> tuple[float, float]:
    """Improved precision and recall of ``fake`` against ``real`` features."""
    precision = inside_manifold(fake, real, knn_radii(real, k, batch_size), batch_size).mean()
    recall = inside_manifold(real, fake, knn_radii(fake, k, batch_size), batch_size).mean()
    return float(precision), float(recall)


def compare(
    fake_features: np.ndarray,
    fake_probs: np.ndarray,
    real_features: np.ndarray,
    k: int,
    batch_size: int,
) -> dict[str, float]:
    """Every figure of one sample set against a real one: what metrics.json reports for the
    generator (samples vs test set) and for the floor (test set vs training set)."""
    precision, recall = precision_recall(real_features, fake_features, k, batch_size)
    return {
        "fid": frechet_distance(fake_features, real_features),
        "classifier_score": classifier_score(fake_probs),
        "precision": precision,
        "recall": recall,
        **coverage(class_shares(np.argmax(fake_probs, axis=1), fake_probs.shape[1])),
    }

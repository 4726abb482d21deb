"""Sample-quality metrics for MNIST, computed with the features of ``ddpm_core.classifier``.

- Fréchet distance between Gaussian fits of classifier features (the FID formula of Heusel et
  al. 2017 with an MNIST classifier in place of Inception), for samples against test images, and
  for training against test images at the same n. The second number, the real-data floor, is
  what a perfect generator would score at that n, because the estimate is biased upward for
  finite n.
- Confident share: the share of samples that the classifier assigns to one class with
  probability >= 0.9. Blurry or malformed digits get lower probabilities.
- Class histogram of the classifier's predictions and its KL divergence from the uniform
  distribution. A mode-collapsed generator gets a large KL, up to log(10) for a single class.
- Median L2 distance in pixel space ([-1, 1]) from each sample to its nearest training image.
  Values near 0 mean that the model reproduces training images.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from scipy.special import xlogy

from ddpm_core.classifier import Classifier, to_model_range
from ddpm_core.data import NUM_CLASSES

logger = logging.getLogger(__name__)

CONFIDENCE_THRESHOLD = 0.9
# Added to the covariances' diagonals when sqrtm of their product is singular or far from real.
FRECHET_EPS = 1e-6
# Largest imaginary part of sqrtm(cov1 @ cov2), relative to its largest entry, dropped as rounding.
MAX_RELATIVE_IMAGINARY = 1e-3
NEAREST_BATCH_SIZE = 256


@dataclass(frozen=True)
class EvalResult:
    """Sample-quality metrics of ``n`` samples (see the module docstring)."""

    frechet_distance: float
    real_floor: float
    confident_share: float
    class_histogram: tuple[float, ...]
    class_kl_from_uniform: float
    nearest_train_median: float
    n: int

    def metrics(self, prefix: str = "eval.") -> dict[str, float]:
        """Flat metric names and values for MLflow, with one ``class_share_<digit>`` per class."""
        values = {
            "frechet_distance": self.frechet_distance,
            "real_floor": self.real_floor,
            "confident_share": self.confident_share,
            "class_kl": self.class_kl_from_uniform,
            "nearest_train_median": self.nearest_train_median,
            "num_samples": float(self.n),
        }
        values.update({f"class_share_{digit}": share for digit, share in enumerate(self.class_histogram)})
        return {f"{prefix}{name}": float(value) for name, value in values.items()}


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and sample covariance [D, D] (divided by N - 1) of features [N, D], in float64."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must have shape [N, D] with N >= 2, got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrtm_product(cov1: np.ndarray, cov2: np.ndarray) -> np.ndarray | None:
    """sqrtm(cov1 @ cov2) as a real matrix, or None if it is singular, not finite or far from real."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(cov1 @ cov2)
    # SciPy warns when the product is singular and the root may be inaccurate.
    if any(issubclass(warning.category, scipy.linalg.LinAlgWarning) for warning in caught):
        return None
    if not np.all(np.isfinite(root)):
        return None
    if np.iscomplexobj(root):
        scale = max(float(np.max(np.abs(root.real))), 1e-30)
        if float(np.max(np.abs(root.imag))) > MAX_RELATIVE_IMAGINARY * scale:
            return None
        root = root.real
    return root


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray,
                     eps: float = FRECHET_EPS) -> float:
    """Fréchet distance between N(mu1, cov1) and N(mu2, cov2).

    ``|mu1 - mu2|^2 + tr(cov1) + tr(cov2) - 2 tr(sqrtm(cov1 cov2))``. The root is recomputed
    with ``eps * I`` added to both covariances in three cases: SciPy reports the product as
    singular (for example with fewer samples than feature dimensions), the root is not finite,
    or its imaginary part exceeds ``MAX_RELATIVE_IMAGINARY`` of its largest entry. A smaller
    imaginary part is rounding and is dropped.

    Raises ValueError for mismatched shapes, or if the square root fails even with the offset.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    dim = mu1.shape[0]
    if mu1.shape != (dim,) or mu2.shape != (dim,) or cov1.shape != (dim, dim) or cov2.shape != (dim, dim):
        raise ValueError(
            f"expected means [D] and covariances [D, D] of one D, got {mu1.shape}, {cov1.shape}, "
            f"{mu2.shape}, {cov2.shape}"
        )

    root = _sqrtm_product(cov1, cov2)
    if root is None:
        logger.warning("sqrtm(cov1 @ cov2) is singular or complex; adding %g to the covariance diagonals", eps)
        offset = eps * np.eye(dim)
        cov1, cov2 = cov1 + offset, cov2 + offset
        root = _sqrtm_product(cov1, cov2)
        if root is None:
            raise ValueError(f"sqrtm(cov1 @ cov2) failed even with {eps} added to the diagonals; "
                             "check the features for NaN or infinite values")

    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(root))


def frechet_distance_of_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """Fréchet distance between Gaussian fits of two feature sets [N1, D] and [N2, D]."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def confident_share(probabilities: np.ndarray, threshold: float = CONFIDENCE_THRESHOLD) -> float:
    """Share of rows of probabilities [N, K] whose largest entry is at least ``threshold``."""
    probabilities = np.asarray(probabilities)
    return float(np.mean(probabilities.max(axis=-1) >= threshold))


def class_histogram(probabilities: np.ndarray) -> np.ndarray:
    """Share of rows of probabilities [N, K] predicted as each class, float64 [K]."""
    probabilities = np.asarray(probabilities)
    counts = np.bincount(np.argmax(probabilities, axis=-1), minlength=probabilities.shape[-1])
    return counts / counts.sum()


def kl_from_uniform(histogram: np.ndarray) -> float:
    """KL(histogram || uniform) in nats: sum_k h_k log(K h_k), from 0 up to log(K).

    Empty classes contribute 0 (the limit of h log h), so no epsilon is needed.
    """
    histogram = np.asarray(histogram, np.float64)
    return float(np.sum(xlogy(histogram, histogram * histogram.shape[-1])))


@jax.jit
def _nearest_distances(queries: jnp.ndarray, references: jnp.ndarray, reference_norms: jnp.ndarray) -> jnp.ndarray:
    """Exact L2 distance from each query [B, P] to its nearest reference [M, P].

    The nearest reference is found with |a|^2 + |b|^2 - 2 a.b, and the distance to it is then
    recomputed directly, which avoids the cancellation of that formula (an exact copy gives 0).
    """
    squared = (jnp.sum(queries**2, axis=1)[:, None] + reference_norms[None, :]
               - 2.0 * jnp.matmul(queries, references.T, precision=jax.lax.Precision.HIGHEST))
    nearest = references[jnp.argmin(squared, axis=1)]
    return jnp.sqrt(jnp.sum((queries - nearest) ** 2, axis=1))


def nearest_train_distances(samples: np.ndarray, train_images: np.ndarray,
                            batch_size: int = NEAREST_BATCH_SIZE) -> np.ndarray:
    """L2 distance in [-1, 1] pixel space from each sample to its nearest training image, float32 [N].

    Runs in jitted batches of ``batch_size`` samples (the last one padded) against all training
    images at once, so memory grows as batch_size x number of training images.
    """
    queries = to_model_range(samples).reshape(len(samples), -1)
    references = jnp.asarray(to_model_range(train_images).reshape(len(train_images), -1))
    reference_norms = jnp.sum(references**2, axis=1)
    distances = []
    for start in range(0, queries.shape[0], batch_size):
        batch = queries[start:start + batch_size]
        valid = batch.shape[0]
        if valid < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - valid, batch.shape[1]), batch.dtype)])
        distances.append(np.asarray(_nearest_distances(jnp.asarray(batch), references, reference_norms))[:valid])
    return np.concatenate(distances) if distances else np.zeros((0,), np.float32)


def _check_samples(samples: np.ndarray) -> np.ndarray:
    samples = np.asarray(samples)
    if not np.issubdtype(samples.dtype, np.floating):
        raise ValueError(f"samples must be floating point in [-1, 1], got dtype {samples.dtype}")
    samples = to_model_range(samples)
    if not np.all(np.isfinite(samples)):
        raise ValueError("samples contain NaN or infinite values")
    return samples


def evaluate_samples(samples: np.ndarray, classifier: Classifier, test_images: np.ndarray,
                     train_images: np.ndarray, n: int | None = None, seed: int = 0) -> EvalResult:
    """Compute every metric of the module docstring for the first ``n`` samples.

    Args:
      samples: float [N, 28, 28, 1] in [-1, 1].
      classifier: from ``ddpm_core.classifier.load_or_train_classifier``.
      test_images, train_images: uint8 [M, 28, 28, 1] (or float in [-1, 1]).
      n: images per set in both Fréchet distances (default: all samples). The test images and
        the training images of the real-data floor are seeded random subsets of size n.
      seed: seed of those subsets.

    Raises ValueError if n < 2, or if n exceeds the number of samples, test or training images.
    """
    samples = _check_samples(samples)
    n = samples.shape[0] if n is None else n
    if not 2 <= n <= min(samples.shape[0], len(test_images), len(train_images)):
        raise ValueError(
            f"n must be in [2, {min(samples.shape[0], len(test_images), len(train_images))}] (the smallest of "
            f"{samples.shape[0]} samples, {len(test_images)} test and {len(train_images)} training images), got {n}"
        )
    samples = samples[:n]
    rng = np.random.default_rng(seed)
    test_subset = np.asarray(test_images)[rng.choice(len(test_images), n, replace=False)]
    train_subset = np.asarray(train_images)[rng.choice(len(train_images), n, replace=False)]

    sample_features, probabilities = classifier.features_and_probabilities(samples)
    test_features = classifier.features(test_subset)
    train_features = classifier.features(train_subset)
    histogram = class_histogram(probabilities)

    return EvalResult(
        frechet_distance=frechet_distance_of_features(sample_features, test_features),
        real_floor=frechet_distance_of_features(train_features, test_features),
        confident_share=confident_share(probabilities),
        class_histogram=tuple(float(share) for share in histogram),
        class_kl_from_uniform=kl_from_uniform(histogram),
        nearest_train_median=float(np.median(nearest_train_distances(samples, train_images))),
        n=n,
    )


def _check_requested(samples: np.ndarray, requested_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    samples = _check_samples(samples)
    requested_labels = np.asarray(requested_labels)
    if requested_labels.shape != (samples.shape[0],):
        raise ValueError(f"expected {samples.shape[0]} requested labels, got shape {requested_labels.shape}")
    if requested_labels.size and not np.all((0 <= requested_labels) & (requested_labels < NUM_CLASSES)):
        raise ValueError(f"requested labels must be in [0, {NUM_CLASSES - 1}]")
    return samples, requested_labels


def conditional_accuracy(samples: np.ndarray, requested_labels: np.ndarray, classifier: Classifier) -> float:
    """Share of class-conditional samples that the classifier assigns to the requested digit."""
    samples, requested_labels = _check_requested(samples, requested_labels)
    return classifier.accuracy(samples, requested_labels)


def per_class_accuracy(samples: np.ndarray, requested_labels: np.ndarray,
                       classifier: Classifier) -> tuple[float, np.ndarray]:
    """Overall and per-digit share of samples classified as their requested digit.

    Returns the overall share and float64 [10] with one share per digit, NaN for a digit that
    was not requested.
    """
    samples, requested_labels = _check_requested(samples, requested_labels)
    hits = np.argmax(classifier.predict_proba(samples), axis=-1) == requested_labels
    per_digit = np.full(NUM_CLASSES, np.nan)
    for digit in np.unique(requested_labels):
        per_digit[digit] = float(np.mean(hits[requested_labels == digit]))
    return float(np.mean(hits)) if hits.size else float("nan"), per_digit

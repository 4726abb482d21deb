"""Tests for the sample evaluator: Fréchet distance, class statistics, nearest training images,
the MNIST classifier on a small synthetic problem, and the evaluate_model task.

The test with the real MNIST classifier trains it for minutes, so it runs only when both
DDPM_MNIST_DIR and DDPM_SLOW_TESTS=1 are set.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mlflow import MlflowClient

import ddpm_core.classifier as classifier_module
import tasks.evaluate_model as evaluate_task_module
from ddpm_core.classifier import (
    Classifier,
    ClassifierAccuracyError,
    cache_key,
    classifier_dir,
    load_classifier,
    load_or_train_classifier,
    random_shift,
    save_classifier,
    to_model_range,
    train_classifier,
)
from ddpm_core.config import make_config
from ddpm_core.evaluate import (
    EvalResult,
    class_histogram,
    conditional_accuracy,
    confident_share,
    per_class_accuracy,
    evaluate_samples,
    feature_statistics,
    frechet_distance,
    kl_from_uniform,
    nearest_train_distances,
)
from ddpm_core.schedule import make_coefficients

SYNTHETIC_CHANNELS = (8, 16)


@dataclass(frozen=True)
class ConstantImageEps:
    """Exact noise predictor for data that is always the constant image ``value``."""

    value: float

    def __call__(self, params, x, t, y=None):
        alphas_cumprod = params["alphas_cumprod"][t][:, None, None, None]
        return (x - jnp.sqrt(alphas_cumprod) * self.value) / jnp.sqrt(1.0 - alphas_cumprod)


# ---------------------------------------------------------------- Fréchet distance


def test_frechet_diagonal_known_answer():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2.0 * np.sqrt(var1 * var2))
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_rotated_known_answer():
    # Covariances with the same eigenvectors commute, so the diagonal formula holds in that basis.
    rng = np.random.default_rng(0)
    rotation, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    var1, var2 = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    cov1, cov2 = rotation @ np.diag(var1) @ rotation.T, rotation @ np.diag(var2) @ rotation.T
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2.0 * np.sqrt(var1 * var2))
    assert frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(expected, rel=1e-7)


def test_frechet_identical_gaussians_zero():
    rng = np.random.default_rng(1)
    features = rng.standard_normal((500, 16)) @ rng.standard_normal((16, 16))
    mu, cov = feature_statistics(features)
    assert abs(frechet_distance(mu, cov, mu, cov)) < 1e-6


def test_frechet_one_dimensional():
    # (1 - 3)^2 + 4 + 9 - 2 * sqrt(36) = 5
    assert frechet_distance(1.0, 4.0, 3.0, 9.0) == pytest.approx(5.0)


def test_frechet_singular_covariances_finite():
    # Fewer samples than dimensions: both covariances are singular.
    rng = np.random.default_rng(2)
    stats1 = feature_statistics(rng.standard_normal((5, 20)))
    stats2 = feature_statistics(rng.standard_normal((5, 20)) + 1.0)
    distance = frechet_distance(*stats1, *stats2)
    assert np.isfinite(distance)
    assert distance > 0.0


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="expected means"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_feature_statistics_values():
    features = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]])
    mu, cov = feature_statistics(features)
    np.testing.assert_allclose(mu, [2.0, 4.0])
    np.testing.assert_allclose(cov, np.cov(features.T))


def test_feature_statistics_rejects_one_row():
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(np.zeros((1, 4)))


# ---------------------------------------------------------------- class statistics


def test_kl_uniform_histogram_zero():
    assert kl_from_uniform(np.full(10, 0.1)) == pytest.approx(0.0, abs=1e-12)


def test_kl_one_class_histogram_log10():
    histogram = np.zeros(10)
    histogram[3] = 1.0
    assert kl_from_uniform(histogram) == pytest.approx(math.log(10.0))


def test_kl_two_classes_log5():
    histogram = np.zeros(10)
    histogram[[0, 9]] = 0.5
    assert kl_from_uniform(histogram) == pytest.approx(math.log(5.0))


def test_confident_share_crafted():
    probabilities = np.array([
        [0.95, 0.05, 0.0],
        [0.9, 0.1, 0.0],  # exactly at the threshold counts
        [0.5, 0.3, 0.2],
        [0.1, 0.1, 0.8],
    ])
    assert confident_share(probabilities) == pytest.approx(0.5)
    assert confident_share(probabilities, threshold=0.75) == pytest.approx(0.75)


def test_class_histogram_crafted():
    probabilities = np.eye(10)[[0, 0, 1, 9]]
    histogram = class_histogram(probabilities)
    assert histogram.shape == (10,)
    np.testing.assert_allclose(histogram[[0, 1, 9]], [0.5, 0.25, 0.25])
    assert histogram.sum() == pytest.approx(1.0)


# ---------------------------------------------------------------- nearest training images


def test_nearest_copies_of_training_images_zero():
    rng = np.random.default_rng(3)
    train = rng.integers(0, 256, (300, 28, 28, 1), dtype=np.uint8)
    samples = to_model_range(train[[5, 17, 17, 299, 0]])
    distances = nearest_train_distances(samples, train, batch_size=2)
    assert distances.shape == (5,)
    np.testing.assert_array_equal(distances, 0.0)


def test_nearest_known_distance():
    train = np.stack([np.full((28, 28, 1), value, np.float32) for value in (-1.0, 0.0, 1.0)])
    samples = np.stack([np.full((28, 28, 1), 0.4, np.float32), np.full((28, 28, 1), -0.9, np.float32)])
    distances = nearest_train_distances(samples, train)
    # Nearest are the 0 image (0.4 * 28) and the -1 image (0.1 * 28).
    np.testing.assert_allclose(distances, [0.4 * 28, 0.1 * 28], rtol=1e-5)


def test_to_model_range_maps_uint8():
    images = np.array([0, 255], np.uint8).reshape(2, 1, 1, 1) * np.ones((1, 28, 28, 1), np.uint8)
    mapped = to_model_range(images)
    assert mapped.dtype == np.float32
    np.testing.assert_allclose(mapped[:, 0, 0, 0], [-1.0, 1.0])


def test_random_shift_moves_pixels():
    images = -np.ones((8, 28, 28, 1), np.float32)
    images[:, 14, 14, 0] = 1.0
    shifted = np.asarray(random_shift(jax.random.PRNGKey(0), jnp.asarray(images), 2))
    assert shifted.shape == images.shape
    for image in shifted:
        rows, cols, _ = np.nonzero(image > 0)
        assert len(rows) == 1
        assert abs(rows[0] - 14) <= 2
        assert abs(cols[0] - 14) <= 2
    # The background filled in at the borders is -1.
    assert np.all(shifted[:, [0, 1, 26, 27], :, :] == -1.0)


def test_to_model_range_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"\[N, 28, 28, 1\]"):
        to_model_range(np.zeros((2, 28, 28), np.uint8))


# ---------------------------------------------------------------- classifier on synthetic digits


def make_synthetic_digits(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [count, 28, 28, 1]: class k is a bright 6x6 square at one of 10 places, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, count).astype(np.int32)
    images = rng.integers(0, 60, (count, 28, 28, 1)).astype(np.int32)
    for index, label in enumerate(labels):
        row, col = 2 + 12 * (label // 5), 1 + 5 * (label % 5)
        images[index, row:row + 6, col:col + 6, 0] += 180
    return np.clip(images, 0, 255).astype(np.uint8), labels


@pytest.fixture(scope="module")
def synthetic_data():
    train_images, train_labels = make_synthetic_digits(640, seed=0)
    test_images, test_labels = make_synthetic_digits(200, seed=1)
    return train_images, train_labels, test_images, test_labels


@pytest.fixture(scope="module")
def synthetic_classifier(synthetic_data):
    classifier, _, accuracy = train_classifier(*synthetic_data, seed=0, epochs=2, batch_size=32,
                                               channels=SYNTHETIC_CHANNELS)
    return classifier, accuracy


def test_classifier_learns_synthetic_digits(synthetic_classifier):
    classifier, accuracy = synthetic_classifier
    assert accuracy >= 0.95
    assert classifier.test_accuracy == accuracy


def test_classifier_output_shapes(synthetic_classifier, synthetic_data):
    classifier, _ = synthetic_classifier
    images = synthetic_data[2][:7]  # not a multiple of the inference batch size
    features, probabilities = classifier.features_and_probabilities(images)
    assert features.shape == (7, classifier_module.FEATURE_DIM)
    assert probabilities.shape == (7, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    # uint8 input and the same images in [-1, 1] give the same features.
    np.testing.assert_allclose(classifier.features(to_model_range(images)), features, rtol=1e-5, atol=1e-6)


def test_classifier_save_load_round_trip(synthetic_classifier, synthetic_data, tmp_path):
    classifier, _ = synthetic_classifier
    save_classifier(str(tmp_path / "cls"), classifier, {"channels": list(SYNTHETIC_CHANNELS)})
    loaded = load_classifier(str(tmp_path / "cls"))
    images = synthetic_data[2][:10]
    assert loaded.test_accuracy == classifier.test_accuracy
    np.testing.assert_allclose(loaded.predict_proba(images), classifier.predict_proba(images), rtol=1e-6)


def test_load_classifier_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="classifier.json"):
        load_classifier(str(tmp_path / "nothing"))


def test_cache_key_uses_source_fingerprint(tmp_path):
    assert cache_key("/data/source-0123abcd4567ef89/ddpm_mnist/1.0.0") == "0123abcd4567ef89"
    other = cache_key(str(tmp_path / "prepared"))
    assert len(other) == 16
    assert other != cache_key(str(tmp_path / "other"))


def test_load_or_train_caches_accurate_classifier(synthetic_data, tmp_path, monkeypatch):
    train_images, train_labels, test_images, test_labels = synthetic_data
    splits = {"train": (train_images, train_labels), "test": (test_images, test_labels)}
    monkeypatch.setattr(classifier_module, "load_split", lambda directory, split: splits[split])
    small = dict(batch_size=32, channels=SYNTHETIC_CHANNELS)
    dataset_dir = str(tmp_path / "data" / "source-00ff00ff00ff00ff" / "ddpm_mnist" / "1.0.0")
    cache_dir = str(tmp_path / "cache")

    # An impossible threshold raises with the accuracy and caches nothing.
    with pytest.raises(ClassifierAccuracyError, match="test accuracy"):
        load_or_train_classifier(dataset_dir, cache_dir, epochs=1, min_accuracy=1.01, **small)
    assert not os.path.exists(os.path.join(classifier_dir(dataset_dir, cache_dir), "classifier.json"))

    trained = load_or_train_classifier(dataset_dir, cache_dir, epochs=2, min_accuracy=0.9, **small)
    assert trained.test_accuracy >= 0.9
    assert "00ff00ff00ff00ff" in classifier_dir(dataset_dir, cache_dir)

    def fail_train(*args, **kwargs):
        raise AssertionError("the cached classifier should have been loaded")

    monkeypatch.setattr(classifier_module, "train_classifier", fail_train)
    loaded = load_or_train_classifier(dataset_dir, cache_dir, min_accuracy=0.9)
    np.testing.assert_allclose(loaded.predict_proba(test_images[:5]), trained.predict_proba(test_images[:5]),
                               rtol=1e-6)


def test_train_classifier_rejects_small_set(synthetic_data):
    train_images, train_labels, test_images, test_labels = synthetic_data
    with pytest.raises(ValueError, match="at least batch_size"):
        train_classifier(train_images[:10], train_labels[:10], test_images, test_labels, batch_size=32)


# ---------------------------------------------------------------- evaluate_samples


def test_evaluate_samples_on_train_copies(synthetic_classifier, synthetic_data):
    classifier, _ = synthetic_classifier
    train_images, _, test_images, _ = synthetic_data
    samples = to_model_range(train_images[:100])
    result = evaluate_samples(samples, classifier, test_images, train_images, n=100, seed=0)

    assert isinstance(result, EvalResult)
    assert result.n == 100
    assert result.nearest_train_median == 0.0
    assert result.frechet_distance >= 0.0
    assert result.real_floor >= 0.0
    assert 0.0 <= result.confident_share <= 1.0
    assert len(result.class_histogram) == 10
    assert sum(result.class_histogram) == pytest.approx(1.0)
    assert 0.0 <= result.class_kl_from_uniform <= math.log(10.0) + 1e-9
    metrics = result.metrics()
    assert metrics["eval.class_kl"] == result.class_kl_from_uniform
    assert metrics["eval.class_share_9"] == result.class_histogram[9]
    assert all(isinstance(value, float) for value in metrics.values())


def test_evaluate_samples_detects_mode_collapse(synthetic_classifier, synthetic_data):
    classifier, _ = synthetic_classifier
    train_images, train_labels, test_images, _ = synthetic_data
    collapsed = to_model_range(np.repeat(train_images[train_labels == 4][:1], 50, axis=0))
    varied = to_model_range(train_images[:50])
    collapsed_result = evaluate_samples(collapsed, classifier, test_images, train_images, seed=0)
    varied_result = evaluate_samples(varied, classifier, test_images, train_images, seed=0)

    assert collapsed_result.class_kl_from_uniform == pytest.approx(math.log(10.0))
    assert collapsed_result.frechet_distance > varied_result.frechet_distance


def test_evaluate_samples_rejects_bad_n(synthetic_classifier, synthetic_data):
    classifier, _ = synthetic_classifier
    train_images, _, test_images, _ = synthetic_data
    samples = to_model_range(train_images[:10])
    for n in (1, 11):
        with pytest.raises(ValueError, match="n must be in"):
            evaluate_samples(samples, classifier, test_images, train_images, n=n)


def test_evaluate_samples_rejects_nan(synthetic_classifier, synthetic_data):
    classifier, _ = synthetic_classifier
    train_images, _, test_images, _ = synthetic_data
    samples = to_model_range(train_images[:10])
    samples[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluate_samples(samples, classifier, test_images, train_images)


def test_conditional_accuracy(synthetic_classifier, synthetic_data):
    classifier, _ = synthetic_classifier
    _, _, test_images, test_labels = synthetic_data
    samples = to_model_range(test_images[:40])
    assert conditional_accuracy(samples, test_labels[:40], classifier) >= 0.9
    assert conditional_accuracy(samples, (test_labels[:40] + 1) % 10, classifier) <= 0.1
    with pytest.raises(ValueError, match="requested labels"):
        conditional_accuracy(samples, test_labels[:39], classifier)


def test_per_class_accuracy(synthetic_classifier, synthetic_data):
    classifier, _ = synthetic_classifier
    _, _, test_images, test_labels = synthetic_data
    keep = test_labels != 3  # digit 3 is never requested
    samples, labels = to_model_range(test_images[keep]), test_labels[keep]
    overall, per_digit = per_class_accuracy(samples, labels, classifier)
    assert overall == pytest.approx(conditional_accuracy(samples, labels, classifier))
    assert per_digit.shape == (10,)
    assert np.isnan(per_digit[3])
    assert np.all(per_digit[np.arange(10) != 3] >= 0.8)
    # Weighted by how often each digit was requested, the per-digit shares give the overall one.
    counts = np.bincount(labels, minlength=10)
    assert np.nansum(per_digit * counts) / counts.sum() == pytest.approx(overall)
    _, wrong = per_class_accuracy(samples, (labels + 1) % 10, classifier)
    assert np.nanmax(wrong) <= 0.2


@dataclass(frozen=True)
class ClassMeanEps:
    """Exact noise predictor for data that is always the mean image of the requested class.

    The null label 10 stands for the mean over all classes.
    """

    def __call__(self, params, x, t, y=None):
        alphas_cumprod = params["alphas_cumprod"][t][:, None, None, None]
        labels = jnp.full(x.shape[0], 10) if y is None else y
        target = params["class_means"][labels]
        return (x - jnp.sqrt(alphas_cumprod) * target) / jnp.sqrt(1.0 - alphas_cumprod)


# ---------------------------------------------------------------- evaluate_model task


@pytest.fixture()
def patched_task(synthetic_classifier, synthetic_data, monkeypatch):
    """evaluate_model with a Gaussian noise predictor as the model and the synthetic classifier."""
    classifier, _ = synthetic_classifier
    train_images, train_labels, test_images, test_labels = synthetic_data
    config = make_config("smoke")
    coeffs = make_coefficients(config.diffusion.schedule, config.diffusion.num_timesteps)
    model = (ConstantImageEps(-0.5), {"alphas_cumprod": coeffs.alphas_cumprod}, config)
    splits = {"train": (train_images, train_labels), "test": (test_images, test_labels)}
    monkeypatch.setattr(evaluate_task_module, "load_registered", lambda uri, tracking: model)
    monkeypatch.setattr(evaluate_task_module, "load_or_train_classifier", lambda data, cache: classifier)
    monkeypatch.setattr(evaluate_task_module, "load_split", lambda directory, split: splits[split])


def test_evaluate_model_fn_logs_metrics(patched_task, tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri)
    experiment_id = client.create_experiment("test-eval", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(experiment_id).info.run_id

    metrics = evaluate_task_module.evaluate_model.fn(
        "models:/test/1", tracking_uri, "unused", "unused", mlflow_run_id=run_id, num_samples=20,
        sampler="dpm_solver_pp", steps=5)

    assert set(metrics) >= {"eval.frechet_distance", "eval.real_floor", "eval.confident_share",
                            "eval.class_kl", "eval.nearest_train_median", "eval.class_share_0"}
    assert all(isinstance(value, float) for value in metrics.values())
    logged = client.get_run(run_id).data
    assert logged.metrics["eval.frechet_distance"] == pytest.approx(metrics["eval.frechet_distance"])
    assert logged.metrics["eval.num_samples"] == 20.0
    assert logged.metrics["eval.seed"] == 0.0
    assert logged.tags["eval.sampler"] == "dpm_solver_pp"
    assert logged.tags["eval.classifier"].startswith("mnist-classifier-v")
    assert logged.metrics["eval.classifier_test_accuracy"] == pytest.approx(metrics["eval.classifier_test_accuracy"])


def test_evaluate_model_reports_conditional_accuracy(synthetic_classifier, synthetic_data, monkeypatch):
    classifier, _ = synthetic_classifier
    train_images, train_labels, test_images, test_labels = synthetic_data
    config = make_config("smoke", {"model.num_classes": 10})
    coeffs = make_coefficients(config.diffusion.schedule, config.diffusion.num_timesteps)
    pixels = to_model_range(train_images)
    means = np.stack([pixels[train_labels == digit].mean(axis=0) for digit in range(10)] + [pixels.mean(axis=0)])
    params = {"alphas_cumprod": coeffs.alphas_cumprod, "class_means": jnp.asarray(means)}
    splits = {"train": (train_images, train_labels), "test": (test_images, test_labels)}
    monkeypatch.setattr(evaluate_task_module, "load_registered", lambda uri, tracking: (ClassMeanEps(), params, config))
    monkeypatch.setattr(evaluate_task_module, "load_or_train_classifier", lambda data, cache: classifier)
    monkeypatch.setattr(evaluate_task_module, "load_split", lambda directory, split: splits[split])

    metrics = evaluate_task_module.evaluate_model.fn("models:/test/1", "unused", "unused", "unused",
                                                     num_samples=30, sampler="ddim", steps=10, guidance_scale=1.0)

    # Each guided sample is its class's mean image, which the classifier recognises.
    assert metrics["eval.conditional_accuracy"] >= 0.9
    assert metrics["eval.guidance_scale"] == 1.0
    assert {f"eval.conditional_accuracy_{digit}" for digit in range(10)} <= set(metrics)
    shares = [metrics[f"eval.conditional_accuracy_{digit}"] for digit in range(10)]
    assert np.mean(shares) == pytest.approx(metrics["eval.conditional_accuracy"])


def test_evaluate_model_in_flow_creates_artifact(patched_task, prefect_server):
    from prefect import flow
    from prefect.artifacts import Artifact

    @flow
    def evaluate_flow():
        return evaluate_task_module.evaluate_model("models:/test/1", "unused", "unused", "unused",
                                                   num_samples=10, sampler="ddim", steps=4)

    metrics = evaluate_flow()
    assert "eval.frechet_distance" in metrics
    artifact = Artifact.get(evaluate_task_module.ARTIFACT_KEY)
    assert artifact is not None
    assert "eval.frechet_distance" in str(artifact.data)


# ---------------------------------------------------------------- real MNIST (slow, opt-in)


@pytest.mark.skipif(not (os.environ.get("DDPM_MNIST_DIR") and os.environ.get("DDPM_SLOW_TESTS") == "1"),
                    reason="trains the real MNIST classifier for minutes; set DDPM_MNIST_DIR and DDPM_SLOW_TESTS=1")
def test_real_mnist_classifier_and_floor(tmp_path):
    from ddpm_core.data import load_split, prepare_mnist

    dataset_dir = prepare_mnist(str(tmp_path / "data"))
    classifier = load_or_train_classifier(dataset_dir, str(tmp_path / "cache"))
    train_images, _ = load_split(dataset_dir, "train")
    test_images, _ = load_split(dataset_dir, "test")
    real = to_model_range(test_images[:1000])
    result = evaluate_samples(real, classifier, test_images, train_images, n=1000, seed=1)

    assert classifier.test_accuracy >= 0.99
    assert result.confident_share > 0.95
    assert result.class_kl_from_uniform < 0.01
    assert result.nearest_train_median > 0.0

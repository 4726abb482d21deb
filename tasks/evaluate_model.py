"""Task: score a registered model's samples with the MNIST-classifier metrics of ``ddpm_core.evaluate``."""

from __future__ import annotations

import os
import time

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.context import TaskRunContext

from ddpm_core.classifier import classifier_dir, load_or_train_classifier
from ddpm_core.data import load_split
from ddpm_core.evaluate import evaluate_samples, per_class_accuracy
from ddpm_core.generate import generate
from tasks.common import run_logger
from tasks.sample_images import load_registered

ARTIFACT_KEY = "sample-evaluation"


@task(name="evaluate_model", retries=1, retry_delay_seconds=5)
def evaluate_model(model_uri: str, tracking_uri: str, dataset_dir: str, cache_dir: str,
                   mlflow_run_id: str | None = None, num_samples: int = 1000, seed: int = 0,
                   sampler: str = "ddpm", steps: int = 0, batch_size: int = 256,
                   guidance_scale: float = 2.0) -> dict[str, float]:
    """Generate ``num_samples`` images from ``model_uri`` and score them against MNIST.

    The classifier behind the metrics is loaded from ``cache_dir``, or trained there on the
    first call for a dataset (a few minutes on a CPU). The Fréchet distances use n =
    ``num_samples`` images per set. A class-conditional model is also asked for every digit in
    turn (``num_samples`` more images, with classifier-free guidance ``guidance_scale``), and the
    share the classifier agrees with is reported overall and per digit. Metrics are logged to the MLflow run ``mlflow_run_id`` when
    given, and shown as a Prefect table artifact when the task runs inside a flow.

    Returns:
      the metrics of ``EvalResult.metrics`` (``eval.frechet_distance``, ``eval.num_samples`` and so on),
      plus ``eval.seed`` and ``eval.classifier_test_accuracy``, and for class-conditional models
      ``eval.conditional_accuracy`` and ``eval.conditional_accuracy_<digit>``, all as floats.
    """
    logger = run_logger()
    apply_fn, params, config = load_registered(model_uri, tracking_uri)

    start = time.perf_counter()
    samples, _ = generate(apply_fn, params, config, num_samples=num_samples, seed=seed, sampler=sampler,
                          steps=steps, batch_size=batch_size)
    logger.info("Generated %d samples from %s with %s in %.0f s", num_samples, model_uri, sampler,
                time.perf_counter() - start)

    classifier = load_or_train_classifier(dataset_dir, cache_dir)
    train_images, _ = load_split(dataset_dir, "train")
    test_images, _ = load_split(dataset_dir, "test")
    result = evaluate_samples(samples, classifier, test_images, train_images, n=num_samples, seed=seed)
    metrics = result.metrics()
    metrics["eval.seed"] = float(seed)
    # Feature scales differ between classifiers, so Fréchet distances compare only under one classifier.
    metrics["eval.classifier_test_accuracy"] = classifier.test_accuracy
    if config.model.num_classes > 0:
        digits = list(range(config.model.num_classes))
        start = time.perf_counter()
        guided, _ = generate(apply_fn, params, config, num_samples=num_samples, seed=seed + 1, sampler=sampler,
                             steps=steps, batch_size=batch_size, digits=digits, guidance_scale=guidance_scale)
        requested = np.resize(np.asarray(digits, np.int32), num_samples)
        overall, per_digit = per_class_accuracy(guided, requested, classifier)
        metrics["eval.conditional_accuracy"] = overall
        metrics["eval.guidance_scale"] = float(guidance_scale)
        metrics.update({f"eval.conditional_accuracy_{digit}": float(share)
                        for digit, share in enumerate(per_digit) if np.isfinite(share)})
        logger.info("Conditional samples (guidance %.1f, %.0f s): %.1f %% classified as the requested digit, "
                    "lowest digit %.1f %%", guidance_scale, time.perf_counter() - start, 100 * overall,
                    100 * np.nanmin(per_digit))
    classifier_name = os.path.basename(classifier_dir(dataset_dir, cache_dir))
    logger.info("Evaluation of %d samples: Fréchet distance %.3f (real-data floor %.3f), confident share %.3f, "
                "class KL %.4f, nearest-training-image median %.3f", result.n, result.frechet_distance,
                result.real_floor, result.confident_share, result.class_kl_from_uniform,
                result.nearest_train_median)

    if mlflow_run_id:
        timestamp_ms = int(time.time() * 1000)
        client = MlflowClient(tracking_uri)
        client.log_batch(
            mlflow_run_id,
            metrics=[Metric(name, value, timestamp_ms, 0) for name, value in metrics.items()],
            tags=[RunTag("eval.model_uri", model_uri), RunTag("eval.sampler", sampler),
                  RunTag("eval.steps", str(steps)), RunTag("eval.seed", str(seed)),
                  RunTag("eval.classifier", classifier_name)],
        )
        logger.info("Logged %d evaluation metrics to MLflow run %s", len(metrics), mlflow_run_id)

    # Artifacts belong to a task run. A direct call through .fn has none, so it skips the table.
    if TaskRunContext.get() is not None:
        create_table_artifact(
            table=[{"metric": name, "value": round(value, 6)} for name, value in metrics.items()],
            key=ARTIFACT_KEY,
            description=f"Sample quality of {model_uri} ({num_samples} samples, sampler {sampler}, seed {seed})",
        )
    else:
        logger.info("Not in a Prefect task run; skipped the %s table artifact", ARTIFACT_KEY)
    return metrics

"""Flow: prepare MNIST, train, register the model, sample and render, under one MLflow run."""

from __future__ import annotations

import os
import time
from typing import Any

from mlflow import MlflowClient
from prefect import flow
from prefect.runtime import flow_run

from ddpm_core.config import make_config
from ddpm_core.parallel import configure_cpu_devices

from tasks import prepare_dataset, register_model, render_gif, sample_images, train_model
from tasks.common import run_logger
from tasks.evaluate_model import evaluate_model
from tasks.promote_model import CHALLENGER, promote_model
from tasks.settings import load_mlflow_settings, read_manifest, update_manifest
from tasks.tracking import PREFECT_FLOW_RUN_TAG, end_run, start_run, tag_run

# A deployment imports this module in a fresh process: split the CPU into one device per core
# before any JAX computation, so that training shards its batch over every core.
configure_cpu_devices()


def new_run_name(preset: str) -> str:
    """Build a readable, sortable run name such as ``cpu-20261204-153000``."""
    return f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"


@flow(name="train_pipeline")
def train_pipeline(
    preset: str = "cpu",
    overrides: dict[str, Any] | None = None,
    mnist_dir: str | None = None,
    data_dir: str = "data",
    output_dir: str = "outputs",
    run_name: str | None = None,
    mlflow_config: str | None = None,
    classifier_dir: str = "classifier",
) -> dict[str, str]:
    """Train a DDPM on MNIST and register it.

    Args:
      preset: "smoke", "cpu" or "gpu" (see ``ddpm_core.config.PRESETS``).
      overrides: configuration values on top of the preset, e.g. ``{"train.steps": 500}``.
      mnist_dir: local folder with the four original MNIST .gz files (else ``$DDPM_MNIST_DIR``,
        else download).
      data_dir: where the prepared TFDS dataset is kept between runs.
      output_dir: parent folder of the run folders (checkpoints, exported model, samples).
      run_name: name of the run folder; an existing one is resumed from its latest checkpoint.
      mlflow_config: path of the MLflow settings file (default ``./mlflow.yaml``).
      classifier_dir: cache of the MNIST classifier behind the evaluation metrics.

    Every new version becomes the "challenger". It becomes the "champion" when it is the first
    version or beats the champion's Fréchet distance at the same sample count and seed.

    Returns:
      Run folder, MLflow run id, registered model version, its alias, and the GIF and PNG paths.
    """
    logger = run_logger()

    # 1. Validate everything before any work starts.
    config = make_config(preset, overrides)
    settings = load_mlflow_settings(mlflow_config)
    tracking_uri = settings.resolved_tracking_uri()
    run_name = run_name or new_run_name(preset)
    run_dir = os.path.abspath(os.path.join(output_dir, run_name))
    flow_run_id = str(flow_run.id) if flow_run.id else ""

    # 2. One MLflow run for the whole pipeline; a resumed run folder keeps its MLflow run.
    manifest = read_manifest(run_dir)
    mlflow_run_id = manifest.get("mlflow_run_id")
    if mlflow_run_id:
        MlflowClient(tracking_uri).update_run(mlflow_run_id, status="RUNNING")
        tag_run(settings, mlflow_run_id, {PREFECT_FLOW_RUN_TAG: flow_run_id})
        logger.info("Resuming MLflow run %s in %s", mlflow_run_id, run_dir)
    else:
        mlflow_run_id = start_run(settings, run_name, config.flat(),
                                  {PREFECT_FLOW_RUN_TAG: flow_run_id, "preset": preset})
        logger.info("Started MLflow run %s; outputs go to %s", mlflow_run_id, run_dir)
    update_manifest(run_dir, config=config.model_dump(mode="json"), mlflow_run_id=mlflow_run_id,
                    tracking_uri=tracking_uri, model_name=settings.registered_model_name,
                    prefect_flow_run_id=flow_run_id)

    try:
        # 3. Data, training, registration, sampling and rendering, passing paths and ids.
        dataset_dir = prepare_dataset(data_dir=data_dir, mnist_dir=mnist_dir)
        update_manifest(run_dir, dataset_dir=dataset_dir)

        model_dir = train_model(config.model_dump(mode="json"), dataset_dir, run_dir, mlflow_run_id, tracking_uri)
        update_manifest(run_dir, model_dir=model_dir)

        version = register_model(model_dir, mlflow_run_id, settings.registered_model_name, tracking_uri,
                                 alias=CHALLENGER, flow_run_id=flow_run_id)
        model_uri = f"models:/{settings.registered_model_name}/{version}"
        update_manifest(run_dir, model_version=version, model_uri=model_uri)

        metrics = None
        if config.eval.enabled:
            evaluation = config.eval
            metrics = evaluate_model(model_uri, tracking_uri, dataset_dir, os.path.abspath(classifier_dir),
                                     mlflow_run_id, num_samples=evaluation.num_samples, seed=evaluation.seed,
                                     sampler=evaluation.sampler, steps=evaluation.steps,
                                     guidance_scale=evaluation.guidance_scale)
            metrics = {**metrics, "eval.seed": float(evaluation.seed)}
            update_manifest(run_dir, metrics=metrics)
        alias = promote_model(settings.registered_model_name, version, tracking_uri, metrics, mlflow_run_id)
        update_manifest(run_dir, model_alias=alias)

        sample = config.sample
        samples_path = sample_images(model_uri, tracking_uri, os.path.join(run_dir, "samples"),
                                     num_samples=sample.num_samples, seed=sample.seed, sampler=sample.sampler,
                                     steps=sample.steps, frame_every=sample.frame_every)
        update_manifest(run_dir, samples_path=samples_path)

        gif_path, png_path = render_gif(samples_path, os.path.join(run_dir, "samples"), mlflow_run_id,
                                        tracking_uri, grid_cols=sample.grid_cols, upscale=sample.upscale,
                                        frame_duration_ms=sample.frame_duration_ms,
                                        final_hold_ms=sample.final_hold_ms)
        update_manifest(run_dir, gif_path=gif_path, png_path=png_path)
    except BaseException:
        end_run(settings, mlflow_run_id, "FAILED")
        raise
    end_run(settings, mlflow_run_id, "FINISHED")

    logger.info("Done: %s version %s, GIF %s", settings.registered_model_name, version, gif_path)
    return {"run_dir": run_dir, "mlflow_run_id": mlflow_run_id, "model_version": version,
            "model_uri": model_uri, "model_alias": alias, "gif_path": gif_path, "png_path": png_path}

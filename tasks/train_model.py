"""Task: train the U-Net, resuming from the latest checkpoint on a retry."""

from __future__ import annotations

import os
import sys
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric
from prefect import task
from tqdm import tqdm

from ddpm_core.checkpoint import export_model, latest_step, restore_checkpoint, save_checkpoint
from ddpm_core.config import PipelineConfig
from ddpm_core.data import load_split
from ddpm_core.train import LogRecord, create_trainer, run_training
from tasks.common import run_logger

CHECKPOINT_DIR = "checkpoints"
MODEL_DIR = "model"


def _metrics(record: LogRecord, timestamp_ms: int) -> list[Metric]:
    values = {
        "loss": record.loss,
        "learning_rate": record.learning_rate,
        "images_per_second": record.images_per_second,
        "grad_norm": record.grad_norm,
    }
    return [Metric(name, value, timestamp_ms, record.step) for name, value in values.items()]


@task(name="train_model", retries=2, retry_delay_seconds=10)
def train_model(config: dict[str, Any], dataset_dir: str, run_dir: str, mlflow_run_id: str | None = None,
                tracking_uri: str | None = None) -> str:
    """Train on the prepared training split and export the EMA weights; return the model folder.

    Checkpoints go to ``run_dir/checkpoints`` every ``train.checkpoint_every`` steps. A retry, or
    a new call with the same ``run_dir``, resumes from the newest one. Metrics are logged to the
    MLflow run ``mlflow_run_id`` every ``train.log_every`` steps.
    """
    import time

    logger = run_logger()
    pipeline_config = PipelineConfig.model_validate(config)
    train_config = pipeline_config.train
    checkpoint_dir = os.path.join(os.path.abspath(run_dir), CHECKPOINT_DIR)
    model_dir = os.path.join(os.path.abspath(run_dir), MODEL_DIR)
    client = MlflowClient(tracking_uri) if mlflow_run_id else None

    # 1. Resume or start.
    step = latest_step(checkpoint_dir)
    if step is not None:
        trainer, state = restore_checkpoint(checkpoint_dir, pipeline_config, step)
        logger.info("Resuming training from the checkpoint at step %d of %d", step, train_config.steps)
    else:
        trainer, state = create_trainer(pipeline_config)
        logger.info("Starting training: %d steps of %d images", train_config.steps, train_config.batch_size)

    # 2. Data in memory, moved to the device once by run_training.
    images, labels = load_split(dataset_dir, "train")
    logger.info("Loaded %d training images", images.shape[0])

    # 3. Train, logging and checkpointing as configured.
    progress = tqdm(total=train_config.steps, initial=int(state.step), unit="step", desc="train",
                    disable=not sys.stderr.isatty(), file=sys.stderr)

    def on_log(record: LogRecord) -> None:
        logger.info("step %d/%d loss %.4f lr %.2e %.1f images/s", record.step, train_config.steps, record.loss,
                    record.learning_rate, record.images_per_second)
        progress.set_postfix(loss=f"{record.loss:.4f}", refresh=False)
        if client is not None:
            client.log_batch(mlflow_run_id, metrics=_metrics(record, int(time.time() * 1000)))

    def on_chunk(done: int) -> None:
        progress.update(done - progress.n)

    def on_checkpoint(checkpoint_state) -> None:
        save_checkpoint(checkpoint_dir, checkpoint_state, pipeline_config)

    try:
        state = run_training(trainer, state, images, labels, on_log=on_log, on_chunk=on_chunk,
                             on_checkpoint=on_checkpoint)
    finally:
        progress.close()

    # 4. Export the EMA weights for registration and sampling.
    export_model(model_dir, state.ema_params, pipeline_config)
    logger.info("Exported the EMA weights to %s", model_dir)
    return model_dir

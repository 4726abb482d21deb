"""Tasks: generate samples from a registered model, and render them as a GIF and a PNG grid."""

from __future__ import annotations

import os

import mlflow
import numpy as np
from mlflow import MlflowClient
from prefect import task

from ddpm_core.checkpoint import load_model
from ddpm_core.generate import generate
from ddpm_core.render import save_denoising_gif, save_grid_png
from tasks.common import run_logger
from tasks.pyfunc_model import MODEL_ARTIFACT

SAMPLES_FILE = "samples.npz"
GIF_FILE = "denoising.gif"
GRID_FILE = "samples.png"
ARTIFACT_FOLDER = "samples"


def model_uri_for(reference: str, model_name: str) -> str:
    """Turn ``NAME@alias``, ``NAME/3``, ``@alias``, ``3`` or a ``models:/`` URI into a models URI."""
    if reference.startswith("models:/"):
        return reference
    if reference.isdigit():
        return f"models:/{model_name}/{reference}"
    if reference.startswith("@"):
        return f"models:/{model_name}{reference}"
    if "@" in reference or "/" in reference:
        return f"models:/{reference}"
    raise ValueError(
        f"invalid model reference {reference!r}; use NAME@alias, NAME/VERSION, @alias, a version number "
        "or a models:/ URI"
    )


def load_registered(model_uri: str, tracking_uri: str):
    """Download a registered model's weights and load them: (apply_fn, params, config)."""
    mlflow.set_tracking_uri(tracking_uri)
    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri)
    return load_model(os.path.join(local, "artifacts", MODEL_ARTIFACT))


@task(name="sample_images", retries=1, retry_delay_seconds=5)
def sample_images(model_uri: str, tracking_uri: str, out_dir: str, num_samples: int = 64, seed: int = 0,
                  sampler: str = "ddpm", steps: int = 0, eta: float = 0.0, frame_every: int = 20,
                  batch_size: int = 256, digits: list[int] | None = None, guidance_scale: float = 2.0) -> str:
    """Generate images from ``model_uri`` (``models:/NAME@alias`` or ``models:/NAME/VERSION``).

    Writes ``out_dir/samples.npz`` with ``images`` [N, 28, 28, 1] and ``frames`` [F, B, 28, 28, 1]
    in [-1, 1], and returns its path. ``steps`` applies to ddim and dpm_solver_pp (0 is the
    sampler's default).
    """
    logger = run_logger()
    apply_fn, params, config = load_registered(model_uri, tracking_uri)
    logger.info("Sampling %d images from %s with %s (seed %d)", num_samples, model_uri, sampler, seed)
    images, frames = generate(apply_fn, params, config, num_samples=num_samples, seed=seed, sampler=sampler,
                              steps=steps, eta=eta, frame_every=frame_every, batch_size=batch_size,
                              digits=digits, guidance_scale=guidance_scale)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(os.path.abspath(out_dir), SAMPLES_FILE)
    temporary = path + ".tmp.npz"
    np.savez_compressed(temporary, images=images, frames=frames)
    os.replace(temporary, path)
    logger.info("Wrote %d samples to %s", images.shape[0], path)
    return path


@task(name="render_gif", retries=1, retry_delay_seconds=5)
def render_gif(samples_path: str, out_dir: str, mlflow_run_id: str | None = None, tracking_uri: str | None = None,
               grid_cols: int = 8, upscale: int = 3, frame_duration_ms: int = 60,
               final_hold_ms: int = 1500) -> list[str]:
    """Render the denoising GIF and the final PNG grid; log both as artifacts of the MLflow run.

    Returns [gif_path, png_path].
    """
    logger = run_logger()
    with np.load(samples_path) as samples:
        images, frames = samples["images"], samples["frames"]
    grid_count = frames.shape[1] if frames.shape[0] else images.shape[0]
    gif_path = os.path.join(os.path.abspath(out_dir), GIF_FILE)
    png_path = os.path.join(os.path.abspath(out_dir), GRID_FILE)
    if frames.shape[0] == 0:
        frames = images[None]
    save_denoising_gif(frames, gif_path, grid_cols, upscale, frame_duration_ms, final_hold_ms)
    save_grid_png(images[:grid_count], png_path, grid_cols, upscale)
    logger.info("Wrote %s and %s", gif_path, png_path)
    if mlflow_run_id:
        client = MlflowClient(tracking_uri)
        client.log_artifact(mlflow_run_id, gif_path, ARTIFACT_FOLDER)
        client.log_artifact(mlflow_run_id, png_path, ARTIFACT_FOLDER)
        logger.info("Logged the GIF and grid to MLflow run %s under %s/", mlflow_run_id, ARTIFACT_FOLDER)
    return [gif_path, png_path]

"""Batch image generation from a trained model, shared by the tasks, the CLI and the MLflow model."""

from __future__ import annotations

import logging
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_core.config import IMAGE_CHANNELS, IMAGE_SIZE, PipelineConfig
from ddpm_core.parallel import make_mesh, put_replicated
from ddpm_core.sampling import ddim_sample, ddpm_sample, dpm_solver_pp_sample
from ddpm_core.schedule import make_coefficients
from ddpm_core.unet import ModelApply

logger = logging.getLogger(__name__)

SAMPLERS = ("ddpm", "ddpm_large", "ddim", "dpm_solver_pp")
Sampler = Literal["ddpm", "ddpm_large", "ddim", "dpm_solver_pp"]
# Steps of "dpm_solver_pp" when steps is 0, capped at T.
DPM_SOLVER_DEFAULT_STEPS = 20
# Key stream folded into the sampling seed, apart from the training streams.
SAMPLE_KEY_STREAM = 2


def generate(
    apply_fn: ModelApply,
    params: Any,
    config: PipelineConfig,
    num_samples: int,
    seed: int = 0,
    sampler: str = "ddpm",
    steps: int = 0,
    eta: float = 0.0,
    frame_every: int = 0,
    batch_size: int = 256,
    digits: list[int] | None = None,
    guidance_scale: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``num_samples`` images in batches of at most ``batch_size``.

    Args:
      sampler: "ddpm" (ancestral, posterior variance), "ddpm_large" (ancestral, beta variance),
        "ddim" (deterministic for eta = 0) or "dpm_solver_pp" (DPM-Solver++(2M), deterministic).
      steps: sampling steps for "ddim" and "dpm_solver_pp" (1 to T). 0 means T for "ddim" and
        ``min(DPM_SOLVER_DEFAULT_STEPS, T)`` (20) for "dpm_solver_pp". The ancestral samplers
        always use T.
      frame_every: keep a GIF frame every this many steps (0: none). Frames are returned for the
        first batch only, which bounds memory for large requests.
      digits: labels to request from a class-conditional model, repeated to ``num_samples``.

    With several local devices (for example a CPU split by ``configure_cpu_devices``), each
    batch whose size the device count divides is split over them; the images stay the same.

    Returns:
      images float32 [N, 28, 28, 1] in [-1, 1] and frames float32 [F, B, 28, 28, 1] (empty when
      ``frame_every`` is 0). The same seed and arguments give the same images.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    num_timesteps = config.diffusion.num_timesteps
    if not 0 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [0, {num_timesteps}] (0 means the sampler's default), got {steps}")
    num_classes = config.model.num_classes
    labels_all = None
    if digits:
        if num_classes == 0:
            raise ValueError("this model is unconditional; it cannot generate requested digits")
        bad = [d for d in digits if not 0 <= d < num_classes]
        if bad:
            raise ValueError(f"digits must be in [0, {num_classes - 1}], got {bad}")
        labels_all = np.resize(np.asarray(digits, np.int32), num_samples)

    coeffs = make_coefficients(config.diffusion.schedule, num_timesteps)
    mesh = make_mesh(jax.local_devices()) if jax.local_device_count() > 1 else None
    params_on_mesh = put_replicated(params, mesh) if mesh is not None else params
    base_key = jax.random.fold_in(jax.random.PRNGKey(seed), SAMPLE_KEY_STREAM)
    images, first_frames = [], None
    for batch_index, start in enumerate(range(0, num_samples, batch_size)):
        count = min(batch_size, num_samples - start)
        key = jax.random.fold_in(base_key, batch_index)
        shape = (count, IMAGE_SIZE, IMAGE_SIZE, IMAGE_CHANNELS)
        labels = None if labels_all is None else jnp.asarray(labels_all[start:start + count])
        keep_frames = frame_every if batch_index == 0 else 0
        split = mesh is not None and count % mesh.size == 0
        common = dict(prediction_type=config.diffusion.prediction_type, frame_every=keep_frames, labels=labels,
                      guidance_scale=float(guidance_scale), null_label=num_classes, mesh=mesh if split else None)
        batch_params = params_on_mesh if split else params
        if sampler == "ddim":
            batch, frames = ddim_sample(apply_fn, batch_params, coeffs, key, shape, num_steps=steps or num_timesteps,
                                        eta=eta, **common)
        elif sampler == "dpm_solver_pp":
            num_steps = steps or min(DPM_SOLVER_DEFAULT_STEPS, num_timesteps)
            batch, frames = dpm_solver_pp_sample(apply_fn, batch_params, coeffs, key, shape, num_steps=num_steps,
                                                 **common)
        else:
            variance = "fixed_small" if sampler == "ddpm" else "fixed_large"
            batch, frames = ddpm_sample(apply_fn, batch_params, coeffs, key, shape, variance=variance, **common)
        images.append(np.asarray(batch))
        if batch_index == 0:
            first_frames = np.asarray(frames)
        logger.info("Generated %d of %d images", start + count, num_samples)
    return np.concatenate(images), first_frames

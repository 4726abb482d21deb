"""Forward process, posterior and training loss of a DDPM (Ho et al. 2020).

Images are float32 [B, H, W, C] in [-1, 1]; ``t`` is int32 [B] in {0, ..., T-1} with the
convention of ``ddpm_core.schedule``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ddpm_core.schedule import DiffusionCoefficients

# model_fn(x_t, t) -> network output of the same shape as x_t.
ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def extract(coefficient: jnp.ndarray, t: jnp.ndarray, ndim: int = 4) -> jnp.ndarray:
    """Gather ``coefficient[t]`` and reshape it to [B, 1, 1, 1] for broadcasting over images."""
    return coefficient[t].reshape(t.shape + (1,) * (ndim - t.ndim))


def q_sample(coeffs: DiffusionCoefficients, x_start: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
    """Draw x_t from q(x_t | x_0) = N(sqrt(alphas_cumprod[t]) x_0, (1 - alphas_cumprod[t]) I) (Eq. 4)."""
    return (
        extract(coeffs.sqrt_alphas_cumprod, t) * x_start
        + extract(coeffs.sqrt_one_minus_alphas_cumprod, t) * noise
    )


def q_posterior_mean_variance(
    coeffs: DiffusionCoefficients, x_start: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0) (Eq. 6 and 7).

    Returns the mean [B, H, W, C] and the variance and log variance, each [B, 1, 1, 1].
    """
    mean = extract(coeffs.posterior_mean_coef1, t) * x_start + extract(coeffs.posterior_mean_coef2, t) * x_t
    variance = extract(coeffs.posterior_variance, t)
    log_variance = extract(coeffs.posterior_log_variance_clipped, t)
    return mean, variance, log_variance


def predict_start_from_eps(coeffs: DiffusionCoefficients, x_t: jnp.ndarray, t: jnp.ndarray, eps: jnp.ndarray) -> jnp.ndarray:
    """Invert Eq. 4: x_0 = x_t / sqrt(alphas_cumprod) - sqrt(1 / alphas_cumprod - 1) eps."""
    return extract(coeffs.sqrt_recip_alphas_cumprod, t) * x_t - extract(coeffs.sqrt_recipm1_alphas_cumprod, t) * eps


def predict_eps_from_start(coeffs: DiffusionCoefficients, x_t: jnp.ndarray, t: jnp.ndarray, x_start: jnp.ndarray) -> jnp.ndarray:
    """Invert Eq. 4 for the noise: eps = (x_t / sqrt(alphas_cumprod) - x_0) / sqrt(1 / alphas_cumprod - 1)."""
    return (extract(coeffs.sqrt_recip_alphas_cumprod, t) * x_t - x_start) / extract(
        coeffs.sqrt_recipm1_alphas_cumprod, t
    )


def split_model_output(
    coeffs: DiffusionCoefficients, prediction_type: str, output: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Convert a network output into the predicted (x_start, eps), whatever the prediction type.

    ``v`` is the velocity sqrt(alphas_cumprod) eps - sqrt(1 - alphas_cumprod) x_0 (Salimans and Ho 2022).
    x_start is not clipped here.
    """
    if prediction_type == "eps":
        eps = output
        x_start = predict_start_from_eps(coeffs, x_t, t, eps)
    elif prediction_type == "x_start":
        x_start = output
        eps = predict_eps_from_start(coeffs, x_t, t, x_start)
    elif prediction_type == "v":
        sqrt_ab = extract(coeffs.sqrt_alphas_cumprod, t)
        sqrt_one_minus_ab = extract(coeffs.sqrt_one_minus_alphas_cumprod, t)
        x_start = sqrt_ab * x_t - sqrt_one_minus_ab * output
        eps = sqrt_one_minus_ab * x_t + sqrt_ab * output
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; choose 'eps', 'x_start' or 'v'")
    return x_start, eps


def training_target(
    coeffs: DiffusionCoefficients, prediction_type: str, x_start: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray
) -> jnp.ndarray:
    """What the network should output for x_t = q_sample(x_start, t, noise)."""
    if prediction_type == "eps":
        return noise
    elif prediction_type == "x_start":
        return x_start
    elif prediction_type == "v":
        return extract(coeffs.sqrt_alphas_cumprod, t) * noise - extract(coeffs.sqrt_one_minus_alphas_cumprod, t) * x_start
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; choose 'eps', 'x_start' or 'v'")


def loss_weights(
    coeffs: DiffusionCoefficients, prediction_type: str, weighting: str, t: jnp.ndarray, gamma: float
) -> jnp.ndarray:
    """Per-example loss weights [B].

    ``uniform`` weights every example by 1. ``min_snr`` is Min-SNR-gamma (Hang et al. 2023): the
    weight on the x_0 error is min(SNR, gamma), written in the units of each prediction type.
    """
    if weighting == "uniform":
        return jnp.ones(t.shape, jnp.float32)
    elif weighting == "min_snr":
        alphas_cumprod = coeffs.alphas_cumprod[t]
        snr = alphas_cumprod / (1.0 - alphas_cumprod)
        clipped = jnp.minimum(snr, gamma)
        if prediction_type == "eps":
            return clipped / snr
        elif prediction_type == "x_start":
            return clipped
        elif prediction_type == "v":
            return clipped / (snr + 1.0)
        else:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; choose 'eps', 'x_start' or 'v'")
    else:
        raise ValueError(f"unknown loss weighting {weighting!r}; choose 'uniform' or 'min_snr'")


def diffusion_loss(
    coeffs: DiffusionCoefficients,
    model_fn: ModelFn,
    x_start: jnp.ndarray,
    t: jnp.ndarray,
    noise: jnp.ndarray,
    prediction_type: str = "eps",
    weighting: str = "uniform",
    min_snr_gamma: float = 5.0,
) -> jnp.ndarray:
    """Mean squared error between the network output and its target (Ho et al. 2020, Eq. 14).

    With prediction_type "eps" and uniform weights this is the "simple" loss
    ``E ||eps - eps_theta(x_t, t)||^2``. Returns a float32 scalar.
    """
    x_t = q_sample(coeffs, x_start, t, noise)
    output = model_fn(x_t, t)
    target = training_target(coeffs, prediction_type, x_start, noise, t)
    per_example = jnp.mean(jnp.square(output - target), axis=tuple(range(1, x_start.ndim)))
    weights = loss_weights(coeffs, prediction_type, weighting, t, min_snr_gamma)
    return jnp.mean(weights * per_example)


def sample_timesteps(key: jax.Array, batch_size: int, num_timesteps: int) -> jnp.ndarray:
    """Uniform timesteps, int32 [B] in {0, ..., T-1}."""
    return jax.random.randint(key, (batch_size,), 0, num_timesteps, dtype=jnp.int32)

"""Noise schedules and the coefficients derived from them.

Timestep convention (used by every module): t runs over {0, ..., T-1}, and
``alphas_cumprod[t] = prod_{s=0..t} (1 - betas[s])``, so even t = 0 carries one step of noise.
``alphas_cumprod_prev[t]`` is ``alphas_cumprod[t-1]`` with ``alphas_cumprod_prev[0] = 1``.

All coefficients are computed in float64 with NumPy and stored as float32 JAX arrays.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

# Ho et al. (2020) use betas from 1e-4 to 0.02 for T = 1000.
LINEAR_BETA_START = 1e-4
LINEAR_BETA_END = 0.02
LINEAR_REFERENCE_STEPS = 1000
# Nichol and Dhariwal (2021), Eq. 17: offset s and the clip of beta near t = T.
COSINE_OFFSET = 0.008
MAX_BETA = 0.999


def linear_betas(num_timesteps: int) -> np.ndarray:
    """Linear betas with the T = 1000 range scaled by 1000 / T.

    The scaling keeps ``alphas_cumprod[T-1]`` close to 0 for any T, so the noisiest training input
    matches the pure N(0, I) noise that sampling starts from. Returns float64 [T].
    """
    scale = LINEAR_REFERENCE_STEPS / num_timesteps
    betas = np.linspace(scale * LINEAR_BETA_START, scale * LINEAR_BETA_END, num_timesteps, dtype=np.float64)
    return np.clip(betas, 0.0, MAX_BETA)


def cosine_alpha_bar(u: np.ndarray) -> np.ndarray:
    """``f(u) = cos^2(((u + s) / (1 + s)) * pi / 2)`` for u = t / T in [0, 1] (Nichol and Dhariwal 2021, Eq. 17)."""
    return np.cos((u + COSINE_OFFSET) / (1.0 + COSINE_OFFSET) * math.pi / 2.0) ** 2


def cosine_betas(num_timesteps: int) -> np.ndarray:
    """Cosine betas ``1 - f((t+1)/T) / f(t/T)``, clipped at 0.999. Returns float64 [T]."""
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    alpha_bar = cosine_alpha_bar(steps)
    betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
    return np.clip(betas, 0.0, MAX_BETA)


def make_betas(schedule: str, num_timesteps: int) -> np.ndarray:
    """Betas of the named schedule ("linear" or "cosine"), float64 [T]."""
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be at least 2, got {num_timesteps}")
    if schedule == "linear":
        return linear_betas(num_timesteps)
    elif schedule == "cosine":
        return cosine_betas(num_timesteps)
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose 'linear' or 'cosine'")


class DiffusionCoefficients(NamedTuple):
    """Per-timestep coefficients, each a float32 array of shape [T]."""

    betas: jnp.ndarray
    alphas_cumprod: jnp.ndarray
    alphas_cumprod_prev: jnp.ndarray
    sqrt_alphas_cumprod: jnp.ndarray
    sqrt_one_minus_alphas_cumprod: jnp.ndarray
    sqrt_recip_alphas_cumprod: jnp.ndarray
    sqrt_recipm1_alphas_cumprod: jnp.ndarray
    # Variance of q(x_{t-1} | x_t, x_0); 0 at t = 0 (Ho et al. 2020, Eq. 7).
    posterior_variance: jnp.ndarray
    # log(posterior_variance) with the t = 0 entry replaced by the t = 1 entry, so it is finite.
    posterior_log_variance_clipped: jnp.ndarray
    posterior_mean_coef1: jnp.ndarray
    posterior_mean_coef2: jnp.ndarray

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])


def make_coefficients(schedule: str, num_timesteps: int) -> DiffusionCoefficients:
    """Compute every coefficient in float64 and store it as float32."""
    betas = make_betas(schedule, num_timesteps)
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])

    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    posterior_log_variance_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
    posterior_mean_coef1 = betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod)

    values = dict(
        betas=betas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=posterior_log_variance_clipped,
        posterior_mean_coef1=posterior_mean_coef1,
        posterior_mean_coef2=posterior_mean_coef2,
    )
    return DiffusionCoefficients(**{name: jnp.asarray(value, dtype=jnp.float32) for name, value in values.items()})

"""Pure JAX core of ddpm-pipeline: diffusion math, U-Net, training, sampling, data, rendering.

Conventions used throughout the package:

- Images are float32 arrays in [-1, 1], laid out [B, H, W, C] (MNIST: C = 1).
- Timesteps are integers t in {0, ..., T-1}. ``t = 0`` is the first noising step, so
  ``x_t ~ q(x_t | x_0) = N(sqrt(alphas_cumprod[t]) x_0, (1 - alphas_cumprod[t]) I)`` with
  ``alphas_cumprod[t] = prod_{s <= t} (1 - betas[s])``. Sampling runs t = T-1 down to 0 and
  returns the posterior mean at t = 0 without noise.

This package never imports Prefect or MLflow; the ``tasks`` and ``flows`` packages wrap it.
"""

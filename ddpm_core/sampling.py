"""Samplers, each one jitted ``lax.scan`` over its steps: ancestral DDPM, DDIM and DPM-Solver++(2M).

Ancestral DDPM runs all T steps. Each step predicts x_0 from x_t, clips it to [-1, 1], forms the posterior mean of
q(x_{t-1} | x_t, x_0) from it (Ho et al. 2020, Eq. 7) and adds noise with the chosen variance,
except at t = 0, which returns the mean. Noise at step t comes from ``fold_in(key, t)``, so the
same key gives the same images.

Variances:
- ``fixed_small``: the posterior variance (beta tilde), with its log clipped at t = 0.
- ``fixed_large``: beta_t, with the t = 0 entry replaced by the posterior variance at t = 1, as in
  the original DDPM code.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import Mesh

from ddpm_core.diffusion import extract, q_posterior_mean_variance, split_model_output
from ddpm_core.parallel import constrain_batch
from ddpm_core.schedule import DiffusionCoefficients

# model_fn(x_t [B, H, W, C], t [B]) -> network output [B, H, W, C]
ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
# apply_fn(params, x_t, t, y) -> network output; hashable, such as ddpm_core.unet.ModelApply.
ApplyFn = Callable[..., jnp.ndarray]

VARIANCES = ("fixed_small", "fixed_large")


def log_variance(coeffs: DiffusionCoefficients, variance: str) -> jnp.ndarray:
    """Log of the reverse-step variance per timestep, float32 [T], finite at t = 0."""
    if variance == "fixed_small":
        return coeffs.posterior_log_variance_clipped
    elif variance == "fixed_large":
        return jnp.log(jnp.append(coeffs.posterior_variance[1], coeffs.betas[1:]))
    else:
        raise ValueError(f"unknown variance {variance!r}; choose one of {VARIANCES}")


def ddpm_step(
    coeffs: DiffusionCoefficients,
    model_fn: ModelFn,
    prediction_type: str,
    log_var: jnp.ndarray,
    x_t: jnp.ndarray,
    t: jnp.ndarray,
    key: jax.Array,
) -> jnp.ndarray:
    """Take one ancestral step x_t -> x_{t-1} at a scalar int32 timestep ``t``."""
    t_batch = jnp.full((x_t.shape[0],), t, dtype=jnp.int32)
    output = model_fn(x_t, t_batch)
    x_start, _ = split_model_output(coeffs, prediction_type, output, x_t, t_batch)
    x_start = jnp.clip(x_start, -1.0, 1.0)
    mean, _, _ = q_posterior_mean_variance(coeffs, x_start, x_t, t_batch)
    noise = jax.random.normal(key, x_t.shape, x_t.dtype)
    # No noise at the last step: t = 0 returns the posterior mean.
    nonzero = (t > 0).astype(x_t.dtype)
    return mean + nonzero * jnp.exp(0.5 * extract(log_var, t_batch)) * noise


def frame_schedule(num_timesteps: int, frame_every: int) -> tuple[np.ndarray, int]:
    """Timesteps to run, padded at the front with -1 so their count is a multiple of ``frame_every``.

    Returns the int32 array [num_frames * frame_every] running T-1 down to 0 and the number of
    frames after the initial noise. A frame is kept after every ``frame_every`` entries, so the
    last frame is always the final image.
    """
    num_frames = -(-num_timesteps // frame_every)
    padding = num_frames * frame_every - num_timesteps
    timesteps = np.concatenate([np.full(padding, -1), np.arange(num_timesteps - 1, -1, -1)])
    return timesteps.astype(np.int32), num_frames


def guided_model_fn(apply_fn: ApplyFn, params, labels: jnp.ndarray | None, guidance_scale: float,
                    null_label: int) -> ModelFn:
    """Network closure, with classifier-free guidance when labels are given.

    Guidance combines the conditional and unconditional outputs as
    ``(1 + w) * out(y) - w * out(null)`` (Ho and Salimans 2022), with w = guidance_scale.
    """
    if labels is None:
        return lambda x_t, t: apply_fn(params, x_t, t)

    def model_fn(x_t, t):
        conditional = apply_fn(params, x_t, t, labels)
        if guidance_scale == 0.0:
            return conditional
        unconditional = apply_fn(params, x_t, t, jnp.full_like(labels, null_label))
        return (1.0 + guidance_scale) * conditional - guidance_scale * unconditional

    return model_fn


@partial(jax.jit, static_argnames=("apply_fn", "prediction_type", "variance", "shape", "frame_every", "guidance_scale",
                                   "null_label", "mesh"))
def ddpm_sample(
    apply_fn: ApplyFn,
    params,
    coeffs: DiffusionCoefficients,
    key: jax.Array,
    shape: tuple[int, ...],
    prediction_type: str = "eps",
    variance: str = "fixed_small",
    frame_every: int = 0,
    labels: jnp.ndarray | None = None,
    guidance_scale: float = 0.0,
    null_label: int = 0,
    mesh: Mesh | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Generate images with ancestral DDPM sampling from x_{T} ~ N(0, I).

    Args:
      apply_fn: hashable network function, a static argument of the jitted sampler.
      params: network parameters (the EMA weights).
      coeffs: schedule coefficients of the trained model.
      key: PRNG key; the initial noise uses ``fold_in(key, T)``, step t uses ``fold_in(key, t)``.
      shape: [B, H, W, C] of the output.
      labels: int32 [B] digits for a class-conditional model, or None for unconditional samples.
      guidance_scale: classifier-free guidance weight w (0 is plain conditional sampling).
      null_label: the "no label" index of a class-conditional model (its num_classes).
      frame_every: keep one intermediate frame every this many steps; 0 keeps only the final image.
      mesh: devices to split the batch over (axis ``"data"``, see ``ddpm_core.parallel``), with
        ``params`` replicated on them; None runs on one device. The images do not depend on it.

    Returns:
      images float32 [B, H, W, C] in [-1, 1], and frames float32 [F + 1, B, H, W, C] starting with
      the initial noise and ending with the final images (F = ceil(T / frame_every)), or an empty
      [0, B, H, W, C] array when ``frame_every`` is 0.
    """
    labels = constrain_batch(labels, mesh)
    model_fn = guided_model_fn(apply_fn, params, labels, guidance_scale, null_label)
    num_timesteps = coeffs.num_timesteps
    log_var = log_variance(coeffs, variance)
    x_init = constrain_batch(jax.random.normal(jax.random.fold_in(key, num_timesteps), shape, jnp.float32), mesh)

    def step(x_t, t):
        x_prev = ddpm_step(coeffs, model_fn, prediction_type, log_var, x_t, jnp.maximum(t, 0),
                           jax.random.fold_in(key, t))
        # Padding entries (t = -1) leave x unchanged.
        return jnp.where(t >= 0, x_prev, x_t), None

    if frame_every <= 0:
        timesteps = jnp.arange(num_timesteps - 1, -1, -1, dtype=jnp.int32)
        images, _ = jax.lax.scan(step, x_init, timesteps)
        return jnp.clip(images, -1.0, 1.0), jnp.zeros((0,) + shape, jnp.float32)

    timesteps, num_frames = frame_schedule(num_timesteps, frame_every)

    def chunk(x_t, chunk_timesteps):
        x_t, _ = jax.lax.scan(step, x_t, chunk_timesteps)
        return x_t, x_t

    images, frames = jax.lax.scan(chunk, x_init, jnp.asarray(timesteps).reshape(num_frames, frame_every))
    frames = jnp.concatenate([x_init[None], frames], axis=0)
    return jnp.clip(images, -1.0, 1.0), jnp.clip(frames, -1.0, 1.0)


def scan_in_frames(step: Callable, carry, per_step: tuple[np.ndarray, ...], pad_values: tuple,
                   frame_every: int, image_of: Callable, x_init: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Run ``step`` over the per-step inputs in one ``lax.scan``, keeping a frame every ``frame_every`` steps.

    The inputs are padded at the front with ``pad_values`` so their length is a multiple of
    ``frame_every``, and ``step`` must leave its state unchanged on padding entries. ``image_of``
    takes the images [B, H, W, C] out of the carried state. Returns the final images and the
    frames, both clipped to [-1, 1]; the frames start with ``x_init`` and are empty when
    ``frame_every`` is 0.
    """
    num_steps = len(per_step[0])
    keep_frames = frame_every > 0
    frame_every = frame_every if keep_frames else num_steps
    num_frames = -(-num_steps // frame_every)
    padding = num_frames * frame_every - num_steps
    inputs = tuple(
        jnp.asarray(np.concatenate([np.full(padding, pad, values.dtype), values]).reshape(num_frames, frame_every))
        for values, pad in zip(per_step, pad_values)
    )

    def chunk(state, chunk_inputs):
        state, _ = jax.lax.scan(step, state, chunk_inputs)
        return state, image_of(state)

    carry, frames = jax.lax.scan(chunk, carry, inputs)
    images = jnp.clip(image_of(carry), -1.0, 1.0)
    if not keep_frames:
        return images, jnp.zeros((0,) + x_init.shape, jnp.float32)
    return images, jnp.clip(jnp.concatenate([x_init[None], frames], axis=0), -1.0, 1.0)


def ddim_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """Evenly spaced timesteps from T-1 down to 0, rounded to integers ("linspace" spacing).

    Works for any ``num_steps`` from 1 to T, including counts that do not divide T; with 1 step
    it is [T-1]. Returns int32 [num_steps], strictly decreasing.
    """
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {num_steps}")
    if num_steps == 1:
        return np.array([num_timesteps - 1], np.int32)
    return np.round(np.linspace(num_timesteps - 1, 0, num_steps)).astype(np.int32)


@partial(jax.jit, static_argnames=("apply_fn", "prediction_type", "shape", "num_steps", "frame_every",
                                   "guidance_scale", "null_label", "mesh"))
def ddim_sample(
    apply_fn: ApplyFn,
    params,
    coeffs: DiffusionCoefficients,
    key: jax.Array,
    shape: tuple[int, ...],
    num_steps: int,
    eta: float | jnp.ndarray = 0.0,
    prediction_type: str = "eps",
    frame_every: int = 0,
    labels: jnp.ndarray | None = None,
    guidance_scale: float = 0.0,
    null_label: int = 0,
    mesh: Mesh | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Generate images with DDIM (Song et al. 2021, Eq. 12) over ``ddim_timesteps(T, num_steps)``.

    ``eta`` = 0 is deterministic given the initial noise; ``eta`` = 1 matches the DDPM posterior
    variance on the chosen sub-sequence. The last step goes to alphas_cumprod = 1 (clean images)
    without noise. Arguments and returns are as for ``ddpm_sample``; frames are kept every
    ``frame_every`` sampling steps.
    """
    labels = constrain_batch(labels, mesh)
    model_fn = guided_model_fn(apply_fn, params, labels, guidance_scale, null_label)
    num_timesteps = coeffs.num_timesteps
    timesteps = ddim_timesteps(num_timesteps, num_steps)
    previous = np.append(timesteps[1:], -1).astype(np.int32)
    x_init = constrain_batch(jax.random.normal(jax.random.fold_in(key, num_timesteps), shape, jnp.float32), mesh)
    alphas_cumprod = coeffs.alphas_cumprod

    def step(x_t, inputs):
        t, t_prev, index = inputs
        valid = t >= 0
        t_safe = jnp.maximum(t, 0)
        t_batch = jnp.full((shape[0],), t_safe, jnp.int32)
        x_start, eps = split_model_output(coeffs, prediction_type, model_fn(x_t, t_batch), x_t, t_batch)
        x_start = jnp.clip(x_start, -1.0, 1.0)
        eps = (x_t - jnp.sqrt(alphas_cumprod[t_safe]) * x_start) / jnp.sqrt(1.0 - alphas_cumprod[t_safe])
        ab_t = alphas_cumprod[t_safe]
        ab_prev = jnp.where(t_prev >= 0, alphas_cumprod[jnp.maximum(t_prev, 0)], 1.0)
        sigma = eta * jnp.sqrt((1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev))
        direction = jnp.sqrt(jnp.maximum(1.0 - ab_prev - sigma**2, 0.0)) * eps
        noise = jax.random.normal(jax.random.fold_in(key, index), x_t.shape, x_t.dtype)
        x_prev = jnp.sqrt(ab_prev) * x_start + direction + sigma * noise
        return jnp.where(valid, x_prev, x_t), None

    per_step = (timesteps, previous, np.arange(num_steps, dtype=np.int32))
    return scan_in_frames(step, x_init, per_step, (-1, -1, -1), frame_every, lambda x_t: x_t, x_init)


def _log_snr_half(alphas_cumprod: jnp.ndarray) -> jnp.ndarray:
    """lambda = log(alpha / sigma) = 0.5 * (log(ab) - log(1 - ab)) for alpha = sqrt(ab), sigma = sqrt(1 - ab)."""
    return 0.5 * (jnp.log(alphas_cumprod) - jnp.log1p(-alphas_cumprod))


def log_snr_timesteps(alphas_cumprod: np.ndarray, num_steps: int) -> np.ndarray:
    """``num_steps`` timesteps from T-1 down to 0, evenly spaced in lambda = log(alpha / sigma).

    Targets evenly spaced between lambda(T-1) and lambda(0) are rounded to the nearest training
    timestep (a discrete model is only trained there). Where rounding would repeat a timestep, the
    next one down is taken instead, so the result is strictly decreasing and ends at 0. With
    num_steps = T it is every timestep.

    Raises ValueError unless 1 <= num_steps <= T.
    """
    alphas_cumprod = np.asarray(alphas_cumprod, np.float64)
    num_timesteps = alphas_cumprod.shape[0]
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
    if num_steps == 1:
        return np.array([num_timesteps - 1], np.int32)
    lambdas = 0.5 * (np.log(alphas_cumprod) - np.log1p(-alphas_cumprod))  # decreasing in t
    targets = np.linspace(lambdas[-1], lambdas[0], num_steps)
    # np.interp needs increasing x: lambdas reversed is increasing, over timesteps T-1 .. 0.
    nearest = np.rint(np.interp(targets, lambdas[::-1], np.arange(num_timesteps - 1, -1, -1))).astype(int)
    timesteps = np.empty(num_steps, np.int64)
    for index, t in enumerate(nearest):
        upper = num_timesteps - 1 if index == 0 else timesteps[index - 1] - 1
        lower = num_steps - 1 - index  # leave one timestep for every remaining step
        timesteps[index] = min(max(t, lower), upper)
    return timesteps.astype(np.int32)


def dpm_solver_pp_sample(
    apply_fn: ApplyFn,
    params,
    coeffs: DiffusionCoefficients,
    key: jax.Array,
    shape: tuple[int, ...],
    num_steps: int,
    prediction_type: str = "eps",
    frame_every: int = 0,
    labels: jnp.ndarray | None = None,
    guidance_scale: float = 0.0,
    null_label: int = 0,
    spacing: str = "log_snr",
    mesh: Mesh | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Generate images with the multistep DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2).

    ``spacing`` chooses the timesteps: "log_snr" (default) is ``log_snr_timesteps``, evenly spaced
    in lambda, the variable the solver integrates in; "linspace" is ``ddim_timesteps``. The grid
    is computed here from the concrete ``coeffs``, so this function must be called outside of
    ``jax.jit``; the scan itself is compiled once per grid. Other arguments and the returns are
    as for ``ddim_sample``; the update is described at ``dpm_solver_pp_scan``.
    """
    if spacing == "log_snr":
        timesteps = log_snr_timesteps(np.asarray(coeffs.alphas_cumprod), num_steps)
    elif spacing == "linspace":
        timesteps = ddim_timesteps(coeffs.num_timesteps, num_steps)
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose 'log_snr' or 'linspace'")
    return dpm_solver_pp_scan(apply_fn, params, coeffs, key, shape, tuple(int(t) for t in timesteps),
                              prediction_type, frame_every, labels, guidance_scale, null_label, mesh)


@partial(jax.jit, static_argnames=("apply_fn", "prediction_type", "shape", "timesteps", "frame_every",
                                   "guidance_scale", "null_label", "mesh"))
def dpm_solver_pp_scan(
    apply_fn: ApplyFn,
    params,
    coeffs: DiffusionCoefficients,
    key: jax.Array,
    shape: tuple[int, ...],
    timesteps: tuple[int, ...],
    prediction_type: str = "eps",
    frame_every: int = 0,
    labels: jnp.ndarray | None = None,
    guidance_scale: float = 0.0,
    null_label: int = 0,
    mesh: Mesh | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Run the scan of ``dpm_solver_pp_sample`` over strictly decreasing ``timesteps`` ending at 0.

    The solver integrates the probability-flow ODE in lambda = log(alpha / sigma), with
    alpha = sqrt(alphas_cumprod) and sigma = sqrt(1 - alphas_cumprod), using the network's data
    prediction x_0 clipped to [-1, 1]. It evaluates the network once per step, at the given
    timesteps. Step i goes from timestep t_i to t_{i+1}, and the last step
    goes from t = 0 to the clean image (alpha = 1, sigma = 0). With h = lambda_next - lambda_cur,
    a step is

        x_next = (sigma_next / sigma_cur) x_cur - alpha_next (exp(-h) - 1) D,

    where D is the current x_0 prediction (first order) or, with r = h_prev / h, the second-order
    correction D = (1 + 1 / (2 r)) x0_cur - (1 / (2 r)) x0_prev. The first step has no previous
    prediction and the last step has h = infinity, so both are first order. The last step then
    returns the x_0 prediction at t = 0. The sampler is deterministic given the initial noise,
    which comes from ``fold_in(key, T)`` as in ``ddim_sample``.
    """
    labels = constrain_batch(labels, mesh)
    model_fn = guided_model_fn(apply_fn, params, labels, guidance_scale, null_label)
    num_timesteps = coeffs.num_timesteps
    timesteps = np.asarray(timesteps, np.int32)
    num_steps = timesteps.shape[0]
    following = np.append(timesteps[1:], -1).astype(np.int32)
    preceding = np.insert(timesteps[:-1], 0, -1).astype(np.int32)
    # Second order needs a previous prediction (not at the first step) and a finite h (not at the last).
    second_order = np.zeros(num_steps, bool)
    second_order[1:-1] = True
    x_init = constrain_batch(jax.random.normal(jax.random.fold_in(key, num_timesteps), shape, jnp.float32), mesh)
    alphas_cumprod = coeffs.alphas_cumprod

    def step(carry, inputs):
        x_t, x_start_prev = carry
        t, t_next, t_prev, use_second_order = inputs
        valid = t >= 0
        t_safe = jnp.maximum(t, 0)
        t_batch = jnp.full((shape[0],), t_safe, jnp.int32)
        x_start, _ = split_model_output(coeffs, prediction_type, model_fn(x_t, t_batch), x_t, t_batch)
        x_start = jnp.clip(x_start, -1.0, 1.0)

        ab_cur = alphas_cumprod[t_safe]
        # The final target t_next = -1 is the clean image: alphas_cumprod = 1.
        ab_next = jnp.where(t_next >= 0, alphas_cumprod[jnp.maximum(t_next, 0)], 1.0)
        sigma_cur, sigma_next = jnp.sqrt(1.0 - ab_cur), jnp.sqrt(1.0 - ab_next)
        alpha_cur, alpha_next = jnp.sqrt(ab_cur), jnp.sqrt(ab_next)

        # r = h_prev / h. Placeholder timesteps make both h finite on first-order steps, where r
        # is unused, so no inf or NaN enters the arithmetic.
        lambda_cur = _log_snr_half(ab_cur)
        lambda_next = _log_snr_half(alphas_cumprod[jnp.where(use_second_order, t_next, 0)])
        lambda_prev = _log_snr_half(alphas_cumprod[jnp.where(use_second_order, t_prev, num_timesteps - 1)])
        h = jnp.where(use_second_order, lambda_next - lambda_cur, 1.0)
        h_prev = jnp.where(use_second_order, lambda_cur - lambda_prev, 1.0)
        half_inverse_r = 0.5 * h / h_prev
        correction = half_inverse_r * (x_start - x_start_prev)
        data_term = jnp.where(use_second_order, x_start + correction, x_start)

        # -alpha_next (exp(-h) - 1) = alpha_next - alpha_cur * sigma_next / sigma_cur, since
        # exp(-h) = alpha_cur sigma_next / (sigma_cur alpha_next). This form stays finite at sigma_next = 0.
        x_next = (sigma_next / sigma_cur) * x_t + (alpha_next - alpha_cur * sigma_next / sigma_cur) * data_term
        # Padding entries (t = -1) leave the state unchanged.
        return (jnp.where(valid, x_next, x_t), jnp.where(valid, x_start, x_start_prev)), None

    per_step = (timesteps, following, preceding, second_order)
    return scan_in_frames(step, (x_init, jnp.zeros(shape, jnp.float32)), per_step, (-1, -1, -1, False),
                          frame_every, lambda carry: carry[0], x_init)

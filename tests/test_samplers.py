"""Known-answer tests for every sampler, with the exact noise predictor of Gaussian data.

For data x_0 ~ N(mu, s^2), independent per pixel, the exact noise prediction is

    E[eps | x_t] = sqrt(1 - ab_t) (x_t - sqrt(ab_t) mu) / (ab_t s^2 + 1 - ab_t),

which is affine in x_t. Every sampler is then an affine map of its Gaussian inputs, so the mean
and standard deviation of its output have a closed form. ``exact_statistics`` computes them in
float64 by propagating (mean, variance) through the same update equations, step by step.

Two kinds of checks follow:
- Each sampler matches its own closed form within sampling error. This pins down the
  implementation, including the known discretisation bias of coarse step counts.
- Samplers whose discretisation bias is small recover N(mu, s^2) itself.

Measured std bias at T = 200 (linear schedule, mu = 0.1, s = 0.25; closed form and sampled agree):
ddpm -6.1 %, ddpm_large +1.9 %, DDIM eta 0 with 10 / 37 / 200 steps -41.7 / -12.8 / -2.7 %,
DDIM eta 1 with 10 / 37 / 200 steps -49.9 / -21.8 / -6.1 %, DPM-Solver++(2M) on its log-SNR grid
with 10 / 20 / 37 / 200 steps +0.9 / +0.7 / -0.1 / +0.1 % (on the "linspace" grid of DDIM it was
+2.8 / +15.6 % at 10 / 20 steps). Coarse DDIM steps lose variance here because this data set's
standard deviation is small, so x_0 | x_t changes fastest in the last, low-noise steps, which
the "linspace" timesteps cover with few steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_core.config import make_config
from ddpm_core.generate import DPM_SOLVER_DEFAULT_STEPS, generate
from ddpm_core.sampling import ddim_sample, ddim_timesteps, ddpm_sample, dpm_solver_pp_sample, log_snr_timesteps
from ddpm_core.schedule import make_betas, make_coefficients

T = 200
MU = 0.1
STD = 0.25  # |MU| + 3 STD < 1, so clipping x_0 to [-1, 1] changes almost no sample.
SHAPE = (64, 28, 28, 1)  # 50,176 independent pixel values
# Sampling error at 50k values: about 0.0011 for the mean and 0.32 % for the std.
MEAN_TOLERANCE = 0.005
CLOSED_FORM_STD_TOLERANCE = 0.01  # relative; the measured differences are below 0.4 %
DATA_MEAN_TOLERANCE = 0.01
DATA_STD_TOLERANCE = 0.07  # relative; the ancestral "ddpm" sampler is 6.1 % low at T = 200


@dataclass(frozen=True)
class GaussianEps:
    """Exact noise predictor E[eps | x_t] for data x_0 ~ N(mean, std^2) per pixel.

    ``params`` is ``{"alphas_cumprod": float32 [T]}``. Hashable, so it can be a static argument.
    """

    mean: float
    std: float

    def __call__(self, params, x, t, y=None):
        alphas_cumprod = params["alphas_cumprod"][t][:, None, None, None]
        scale = jnp.sqrt(1.0 - alphas_cumprod) / (alphas_cumprod * self.std**2 + 1.0 - alphas_cumprod)
        return scale * (x - jnp.sqrt(alphas_cumprod) * self.mean)


def _x_start_map(alphas_cumprod: float) -> tuple[float, float]:
    """(gain, offset) of E[x_0 | x_t] = gain * x_t + offset."""
    alpha = np.sqrt(alphas_cumprod)
    gain = alpha * STD**2 / (alphas_cumprod * STD**2 + 1.0 - alphas_cumprod)
    return gain, MU - gain * alpha * MU


def _lambda(alphas_cumprod: float) -> float:
    return 0.5 * np.log(alphas_cumprod / (1.0 - alphas_cumprod))


def exact_statistics(sampler: str, num_steps: int = T, eta: float = 0.0) -> tuple[float, float]:
    """Mean and std of a sampler's output in float64, ignoring clipping, from x_T ~ N(0, 1).

    An affine state ``x = a * x_T + b + (independent noise of variance v)`` is tracked as the
    pair of functions (mean, variance) through each update.
    """
    betas = make_betas("linear", T)
    alphas_cumprod = np.cumprod(1.0 - betas)
    mean, variance = 0.0, 1.0

    if sampler in ("ddpm", "ddpm_large"):
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        if sampler == "ddpm":
            step_variance = posterior_variance
        else:
            step_variance = np.append(posterior_variance[1], betas[1:])
        coef_start = betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        coef_x = (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod)
        for t in range(T - 1, -1, -1):
            gain, offset = _x_start_map(alphas_cumprod[t])
            slope = coef_start[t] * gain + coef_x[t]
            mean = slope * mean + coef_start[t] * offset
            variance = slope**2 * variance + (step_variance[t] if t > 0 else 0.0)
        return mean, np.sqrt(variance)

    timesteps = ddim_timesteps(T, num_steps)
    if sampler == "dpm_solver_pp":
        timesteps = log_snr_timesteps(np.asarray(make_coefficients("linear", T).alphas_cumprod), num_steps)
    if sampler == "ddim":
        for index, t in enumerate(timesteps):
            ab = alphas_cumprod[t]
            ab_next = alphas_cumprod[timesteps[index + 1]] if index + 1 < num_steps else 1.0
            gain, offset = _x_start_map(ab)
            sigma = eta * np.sqrt((1.0 - ab_next) / (1.0 - ab) * (1.0 - ab / ab_next))
            # x_next = sqrt(ab_next) x0 + direction * eps with eps = (x - sqrt(ab) x0) / sqrt(1 - ab).
            direction = np.sqrt(max(1.0 - ab_next - sigma**2, 0.0)) / np.sqrt(1.0 - ab)
            slope = np.sqrt(ab_next) * gain + direction * (1.0 - np.sqrt(ab) * gain)
            intercept = (np.sqrt(ab_next) - direction * np.sqrt(ab)) * offset
            mean = slope * mean + intercept
            variance = slope**2 * variance + sigma**2
        return mean, np.sqrt(variance)

    if sampler == "dpm_solver_pp":
        # Deterministic, so the output is a * x_T + b: track (a, b) of x and of the previous x_0.
        slope, intercept = 1.0, 0.0
        previous_start = (0.0, 0.0)
        previous_h = None
        for index, t in enumerate(timesteps):
            ab = alphas_cumprod[t]
            gain, offset = _x_start_map(ab)
            start = (gain * slope, gain * intercept + offset)
            if index + 1 == num_steps:
                slope, intercept = start
                break
            ab_next = alphas_cumprod[timesteps[index + 1]]
            h = _lambda(ab_next) - _lambda(ab)
            if index == 0:
                data = start
            else:
                weight = h / (2.0 * previous_h)  # 1 / (2 r) with r = h_prev / h
                data = tuple(s + weight * (s - p) for s, p in zip(start, previous_start))
            ratio = np.sqrt(1.0 - ab_next) / np.sqrt(1.0 - ab)
            data_coef = -np.sqrt(ab_next) * np.expm1(-h)
            slope = ratio * slope + data_coef * data[0]
            intercept = ratio * intercept + data_coef * data[1]
            previous_start, previous_h = start, h
        return intercept, abs(slope)

    raise ValueError(f"unknown sampler {sampler!r}")


@pytest.fixture(scope="module")
def gaussian_model():
    coeffs = make_coefficients("linear", T)
    return GaussianEps(MU, STD), {"alphas_cumprod": coeffs.alphas_cumprod}, coeffs


def _draw(gaussian_model, sampler: str, num_steps: int = T, eta: float = 0.0, key: int = 0) -> np.ndarray:
    apply_fn, params, coeffs = gaussian_model
    rng = jax.random.PRNGKey(key)
    if sampler == "ddpm":
        images, _ = ddpm_sample(apply_fn, params, coeffs, rng, SHAPE, variance="fixed_small")
    elif sampler == "ddpm_large":
        images, _ = ddpm_sample(apply_fn, params, coeffs, rng, SHAPE, variance="fixed_large")
    elif sampler == "ddim":
        images, _ = ddim_sample(apply_fn, params, coeffs, rng, SHAPE, num_steps=num_steps, eta=eta)
    elif sampler == "dpm_solver_pp":
        images, _ = dpm_solver_pp_sample(apply_fn, params, coeffs, rng, SHAPE, num_steps=num_steps)
    else:
        raise ValueError(f"unknown sampler {sampler!r}")
    return np.asarray(images, np.float64)


ALL_CASES = [
    ("ddpm", T, 0.0),
    ("ddpm_large", T, 0.0),
    ("ddim", 10, 0.0),
    ("ddim", 37, 0.0),  # 37 does not divide T
    ("ddim", T, 0.0),
    ("ddim", 10, 1.0),
    ("ddim", 37, 1.0),
    ("ddim", T, 1.0),
    ("dpm_solver_pp", 10, 0.0),
    ("dpm_solver_pp", 20, 0.0),
    ("dpm_solver_pp", 37, 0.0),
    ("dpm_solver_pp", T, 0.0),
]
# Cases whose closed-form std is within DATA_STD_TOLERANCE of STD (see the module docstring).
CONVERGED_CASES = [
    ("ddpm", T, 0.0),
    ("ddpm_large", T, 0.0),
    ("ddim", T, 0.0),
    ("ddim", T, 1.0),
    ("dpm_solver_pp", 10, 0.0),
    ("dpm_solver_pp", 20, 0.0),
    ("dpm_solver_pp", 37, 0.0),
    ("dpm_solver_pp", T, 0.0),
]


def _case_id(case) -> str:
    sampler, num_steps, eta = case
    return f"{sampler}-{num_steps}steps-eta{eta:g}"


@pytest.mark.parametrize("case", ALL_CASES, ids=_case_id)
def test_sampler_matches_closed_form(gaussian_model, case):
    sampler, num_steps, eta = case
    samples = _draw(gaussian_model, sampler, num_steps, eta)
    expected_mean, expected_std = exact_statistics(sampler, num_steps, eta)

    assert np.all(np.isfinite(samples))
    assert abs(samples.mean() - expected_mean) < MEAN_TOLERANCE
    assert abs(samples.std() / expected_std - 1.0) < CLOSED_FORM_STD_TOLERANCE


@pytest.mark.parametrize("case", CONVERGED_CASES, ids=_case_id)
def test_sampler_recovers_data_distribution(gaussian_model, case):
    sampler, num_steps, eta = case
    samples = _draw(gaussian_model, sampler, num_steps, eta)

    assert abs(samples.mean() - MU) < DATA_MEAN_TOLERANCE
    assert abs(samples.std() / STD - 1.0) < DATA_STD_TOLERANCE


def test_closed_form_converges_to_data():
    # With T steps the ODE solvers are close to the exact flow, and the second-order solver much closer.
    _, ddim_std = exact_statistics("ddim", T, 0.0)
    _, dpm_std = exact_statistics("dpm_solver_pp", T)
    assert abs(dpm_std / STD - 1.0) < 0.005
    assert abs(dpm_std / STD - 1.0) < abs(ddim_std / STD - 1.0) / 5


def test_dpm_solver_second_order_beats_ddim(gaussian_model):
    ddim_error = abs(_draw(gaussian_model, "ddim", T).std() / STD - 1.0)
    dpm_error = abs(_draw(gaussian_model, "dpm_solver_pp", T).std() / STD - 1.0)
    assert dpm_error < 0.01
    assert dpm_error < ddim_error


def test_ddim_timesteps_one_step():
    np.testing.assert_array_equal(ddim_timesteps(T, 1), [T - 1])


def test_ddim_timesteps_all_steps():
    np.testing.assert_array_equal(ddim_timesteps(T, T), np.arange(T - 1, -1, -1))


@pytest.mark.parametrize("num_steps", [2, 10, 37, 199])
def test_ddim_timesteps_shape_and_order(num_steps):
    timesteps = ddim_timesteps(T, num_steps)
    assert timesteps.dtype == np.int32
    assert timesteps.shape == (num_steps,)
    assert timesteps[0] == T - 1
    assert timesteps[-1] == 0
    assert np.all(np.diff(timesteps) < 0)


@pytest.mark.parametrize("num_steps", [0, T + 1, -1])
def test_ddim_timesteps_rejects_out_of_range(num_steps):
    with pytest.raises(ValueError, match="steps must be in"):
        ddim_timesteps(T, num_steps)


@pytest.mark.parametrize("sampler", ["ddim", "dpm_solver_pp"])
def test_deterministic_sampler_repeats_for_same_key(gaussian_model, sampler):
    first = _draw(gaussian_model, sampler, 10, key=3)
    second = _draw(gaussian_model, sampler, 10, key=3)
    other = _draw(gaussian_model, sampler, 10, key=4)
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(first, other)


def test_dpm_solver_frames(gaussian_model):
    apply_fn, params, coeffs = gaussian_model
    key = jax.random.PRNGKey(0)
    shape = (2, 28, 28, 1)
    plain, no_frames = dpm_solver_pp_sample(apply_fn, params, coeffs, key, shape, num_steps=10)
    images, frames = dpm_solver_pp_sample(apply_fn, params, coeffs, key, shape, num_steps=10, frame_every=4)

    assert no_frames.shape == (0,) + shape
    # 10 steps in frames of 4 (padded to 12): the initial noise plus 3 frames.
    assert frames.shape == (4,) + shape
    np.testing.assert_allclose(frames[-1], images, atol=1e-6)
    np.testing.assert_allclose(images, plain, atol=1e-6)
    np.testing.assert_allclose(frames[0], jnp.clip(jax.random.normal(jax.random.fold_in(key, T), shape), -1, 1))


def test_dpm_solver_one_step_returns_prior_mean_estimate(gaussian_model):
    # One step predicts x_0 at t = T-1, where E[x_0 | x_t] is nearly the data mean.
    samples = _draw(gaussian_model, "dpm_solver_pp", 1)
    assert abs(samples.mean() - MU) < MEAN_TOLERANCE
    assert samples.std() < 0.01


def test_generate_dispatches_dpm_solver_default_steps():
    config = make_config("smoke", {"diffusion.num_timesteps": 50})
    coeffs = make_coefficients("linear", 50)
    apply_fn, params = GaussianEps(MU, STD), {"alphas_cumprod": coeffs.alphas_cumprod}

    default, frames = generate(apply_fn, params, config, num_samples=3, sampler="dpm_solver_pp")
    explicit, _ = generate(apply_fn, params, config, num_samples=3, sampler="dpm_solver_pp",
                           steps=DPM_SOLVER_DEFAULT_STEPS)
    fewer, _ = generate(apply_fn, params, config, num_samples=3, sampler="dpm_solver_pp", steps=5)

    assert default.shape == (3, 28, 28, 1)
    assert frames.shape[0] == 0
    np.testing.assert_array_equal(default, explicit)
    assert not np.allclose(default, fewer)


def test_generate_dpm_solver_rejects_too_many_steps():
    config = make_config("smoke")
    coeffs = make_coefficients("linear", config.diffusion.num_timesteps)
    apply_fn, params = GaussianEps(MU, STD), {"alphas_cumprod": coeffs.alphas_cumprod}
    with pytest.raises(ValueError, match="steps must be in"):
        generate(apply_fn, params, config, num_samples=1, sampler="dpm_solver_pp",
                 steps=config.diffusion.num_timesteps + 1)


@pytest.mark.parametrize("num_steps", [1, 2, 10, 20, 37, T])
def test_log_snr_timesteps_shape_and_order(num_steps):
    alphas_cumprod = np.asarray(make_coefficients("linear", T).alphas_cumprod)
    timesteps = log_snr_timesteps(alphas_cumprod, num_steps)
    assert timesteps.shape == (num_steps,)
    assert timesteps[0] == T - 1
    if num_steps > 1:
        assert timesteps[-1] == 0
        assert np.all(np.diff(timesteps) < 0)
    if num_steps == T:
        np.testing.assert_array_equal(timesteps, np.arange(T - 1, -1, -1))


def test_log_snr_timesteps_even_in_lambda():
    coeffs = make_coefficients("linear", 1000)
    alphas_cumprod = np.asarray(coeffs.alphas_cumprod, np.float64)
    timesteps = log_snr_timesteps(alphas_cumprod, 20)
    lambdas = 0.5 * np.log(alphas_cumprod[timesteps] / (1.0 - alphas_cumprod[timesteps]))
    gaps = np.diff(lambdas)
    even = (lambdas[-1] - lambdas[0]) / 19
    # Rounding to whole timesteps moves each lambda by up to half the lambda change of one
    # timestep, which is small except over the last few timesteps (0.39 from t = 1 to t = 0).
    np.testing.assert_allclose(gaps[:-4], even, rtol=0.05)
    assert np.all(np.abs(gaps - even) < 0.2)
    # The linspace grid of DDIM is far from even in lambda: its last gap is about 6 even gaps.
    linear = ddim_timesteps(1000, 20)
    linear_gaps = np.diff(0.5 * np.log(alphas_cumprod[linear] / (1.0 - alphas_cumprod[linear])))
    assert linear_gaps[-1] > 5 * even


def test_log_snr_timesteps_rejects_bad_counts():
    alphas_cumprod = np.asarray(make_coefficients("linear", 20).alphas_cumprod)
    with pytest.raises(ValueError, match=r"num_steps must be in \[1, 20\]"):
        log_snr_timesteps(alphas_cumprod, 0)
    with pytest.raises(ValueError, match=r"num_steps must be in \[1, 20\]"):
        log_snr_timesteps(alphas_cumprod, 21)

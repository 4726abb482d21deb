"""Tests for ddpm_core.schedule: beta schedules and the coefficients derived from them.

Expected values are computed here in float64 NumPy from the formulas, not from the module.
"""

import math

import numpy as np
import pytest

from ddpm_core import schedule

SCHEDULES = ("linear", "cosine")


def cosine_f(u):
    """f(u) = cos^2(((u + 0.008) / 1.008) * pi / 2), the cosine schedule's alpha-bar curve."""
    return np.cos(((u + 0.008) / 1.008) * math.pi / 2.0) ** 2


def test_linear_betas_reference_endpoints():
    betas = schedule.linear_betas(1000)

    assert betas.dtype == np.float64
    assert betas.shape == (1000,)
    assert betas[0] == 1e-4
    assert betas[-1] == 0.02


def test_linear_betas_scaled_for_short_chains():
    betas = schedule.linear_betas(200)
    expected = np.linspace(5e-4, 0.1, 200)

    assert betas.shape == (200,)
    np.testing.assert_allclose(betas, expected, rtol=1e-12, atol=0)


def test_linear_betas_clipped_at_max_beta():
    # For T = 20 the scaled range ends at 0.02 * 1000 / 20 = 1.0, above the 0.999 clip.
    betas = schedule.linear_betas(20)

    assert betas[-1] == 0.999
    assert betas.max() == 0.999
    assert betas[0] == pytest.approx(0.005, rel=1e-12)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("num_timesteps", [200, 1000])
def test_terminal_alphas_cumprod_near_zero(name, num_timesteps):
    betas = schedule.make_betas(name, num_timesteps)
    terminal = np.prod(1.0 - betas)

    assert terminal < 1e-3


@pytest.mark.parametrize("num_timesteps", [20, 200, 1000])
def test_cosine_alphas_cumprod_matches_formula(num_timesteps):
    betas = schedule.cosine_betas(num_timesteps)
    t = np.arange(num_timesteps, dtype=np.float64)
    unclipped_betas = 1.0 - cosine_f((t + 1) / num_timesteps) / cosine_f(t / num_timesteps)
    # The 0.999 clip changes alpha-bar from the first clipped step on, so compare only before it.
    clipped = np.flatnonzero(unclipped_betas > 0.999)
    first_clipped = clipped[0] if clipped.size else num_timesteps
    expected = cosine_f((t + 1) / num_timesteps) / cosine_f(0.0)

    assert first_clipped >= num_timesteps - 1
    np.testing.assert_allclose(
        np.cumprod(1.0 - betas)[:first_clipped], expected[:first_clipped], rtol=1e-10, atol=0
    )


def test_cosine_betas_clipped_at_max_beta():
    betas = schedule.cosine_betas(1000)

    assert betas.dtype == np.float64
    assert betas.max() <= 0.999
    assert betas.min() > 0.0


@pytest.mark.parametrize("name", SCHEDULES)
def test_coefficients_are_float32(name):
    coeffs = schedule.make_coefficients(name, 20)

    for field, value in coeffs._asdict().items():
        assert value.dtype == np.float32, field
        assert value.shape == (20,), field


@pytest.mark.parametrize("name", SCHEDULES)
def test_coefficients_match_float64_formulas(name):
    num_timesteps = 50
    coeffs = schedule.make_coefficients(name, num_timesteps)
    betas = schedule.make_betas(name, num_timesteps)
    alphas_cumprod = np.cumprod(1.0 - betas)
    alphas_cumprod_prev = np.concatenate([[1.0], alphas_cumprod[:-1]])

    np.testing.assert_allclose(coeffs.betas, betas, rtol=1e-6)
    np.testing.assert_allclose(coeffs.alphas_cumprod, alphas_cumprod, rtol=1e-6)
    np.testing.assert_allclose(coeffs.alphas_cumprod_prev, alphas_cumprod_prev, rtol=1e-6)
    np.testing.assert_allclose(coeffs.sqrt_alphas_cumprod, np.sqrt(alphas_cumprod), rtol=1e-6)
    np.testing.assert_allclose(coeffs.sqrt_one_minus_alphas_cumprod, np.sqrt(1.0 - alphas_cumprod), rtol=1e-6)
    np.testing.assert_allclose(coeffs.sqrt_recip_alphas_cumprod, 1.0 / np.sqrt(alphas_cumprod), rtol=1e-6)
    np.testing.assert_allclose(
        coeffs.sqrt_recipm1_alphas_cumprod, np.sqrt(1.0 / alphas_cumprod - 1.0), rtol=1e-6
    )
    np.testing.assert_allclose(
        coeffs.posterior_variance, betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod), rtol=1e-6
    )


def test_alphas_cumprod_prev_starts_at_one():
    coeffs = schedule.make_coefficients("linear", 20)

    assert float(coeffs.alphas_cumprod_prev[0]) == 1.0
    np.testing.assert_array_equal(coeffs.alphas_cumprod_prev[1:], coeffs.alphas_cumprod[:-1])


@pytest.mark.parametrize("name", SCHEDULES)
def test_posterior_variance_zero_at_first_step(name):
    coeffs = schedule.make_coefficients(name, 20)

    assert float(coeffs.posterior_variance[0]) == 0.0
    assert np.all(np.asarray(coeffs.posterior_variance[1:]) > 0.0)


@pytest.mark.parametrize("name", SCHEDULES)
def test_posterior_log_variance_clipped_finite(name):
    coeffs = schedule.make_coefficients(name, 20)
    log_variance = np.asarray(coeffs.posterior_log_variance_clipped)

    assert np.all(np.isfinite(log_variance))
    assert log_variance[0] == log_variance[1]
    np.testing.assert_allclose(log_variance[1:], np.log(np.asarray(coeffs.posterior_variance[1:])), rtol=1e-5)


def test_num_timesteps_property():
    coeffs = schedule.make_coefficients("cosine", 37)

    assert coeffs.num_timesteps == 37


def test_unknown_schedule_raises():
    with pytest.raises(ValueError, match="quadratic"):
        schedule.make_betas("quadratic", 20)
    with pytest.raises(ValueError, match="quadratic"):
        schedule.make_coefficients("quadratic", 20)


@pytest.mark.parametrize("num_timesteps", [1, 0, -5])
def test_too_few_timesteps_raise(num_timesteps):
    with pytest.raises(ValueError, match="at least 2"):
        schedule.make_betas("linear", num_timesteps)
    with pytest.raises(ValueError, match="at least 2"):
        schedule.make_coefficients("cosine", num_timesteps)

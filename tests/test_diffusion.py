"""Tests for ddpm_core.diffusion: forward process, posterior, prediction types and the loss.

Closed forms are evaluated here in float64 NumPy from the float64 betas of ddpm_core.schedule.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_core import diffusion
from ddpm_core.schedule import make_betas, make_coefficients

T = 20
PREDICTION_TYPES = ("eps", "x_start", "v")


@pytest.fixture(scope="module")
def coeffs():
    return make_coefficients("linear", T)


@pytest.fixture(scope="module")
def reference():
    """Float64 betas, alphas and alpha-bars of the linear T = 20 schedule."""
    betas = make_betas("linear", T)
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.concatenate([[1.0], alphas_cumprod[:-1]])
    return {"betas": betas, "alphas": alphas, "ab": alphas_cumprod, "ab_prev": alphas_cumprod_prev}


@pytest.fixture(scope="module")
def batch():
    """x0 in [-1, 1] and standard normal noise, float64 [3, 28, 28, 1], with t = 0, 1, T-1."""
    rng = np.random.default_rng(0)
    x_start = rng.uniform(-1.0, 1.0, size=(3, 28, 28, 1))
    noise = rng.standard_normal(size=(3, 28, 28, 1))
    t = np.array([0, 1, T - 1], np.int32)
    return x_start, noise, t


def per_example(values):
    """Reshape a float64 [B] array to [B, 1, 1, 1]."""
    return np.asarray(values, np.float64)[:, None, None, None]


def test_extract_broadcast_shape(coeffs):
    t = jnp.array([0, 5, T - 1], jnp.int32)
    gathered = diffusion.extract(coeffs.betas, t)

    assert gathered.shape == (3, 1, 1, 1)
    np.testing.assert_array_equal(np.asarray(gathered).ravel(), np.asarray(coeffs.betas)[[0, 5, T - 1]])


def test_q_sample_matches_closed_form(coeffs, reference, batch):
    x_start, noise, t = batch
    x_t = diffusion.q_sample(coeffs, jnp.asarray(x_start, jnp.float32), jnp.asarray(t),
                             jnp.asarray(noise, jnp.float32))
    ab = per_example(reference["ab"][t])
    expected = np.sqrt(ab) * x_start + np.sqrt(1.0 - ab) * noise

    assert x_t.dtype == jnp.float32
    for row, step in enumerate(t):
        np.testing.assert_allclose(np.asarray(x_t[row]), expected[row], rtol=1e-5, atol=1e-6,
                                   err_msg=f"t={step}")


def test_q_sample_last_step_near_noise(coeffs, batch):
    x_start, noise, _ = batch
    t = jnp.full((3,), T - 1, jnp.int32)
    x_t = diffusion.q_sample(coeffs, jnp.asarray(x_start, jnp.float32), t, jnp.asarray(noise, jnp.float32))

    np.testing.assert_allclose(np.asarray(x_t), noise, atol=1e-4)


def test_posterior_matches_closed_form(coeffs, reference, batch):
    x_start, x_t, t = batch
    mean, variance, log_variance = diffusion.q_posterior_mean_variance(
        coeffs, jnp.asarray(x_start, jnp.float32), jnp.asarray(x_t, jnp.float32), jnp.asarray(t)
    )
    beta = per_example(reference["betas"][t])
    alpha = per_example(reference["alphas"][t])
    ab = per_example(reference["ab"][t])
    ab_prev = per_example(reference["ab_prev"][t])
    expected_mean = (beta * np.sqrt(ab_prev) / (1.0 - ab)) * x_start + ((1.0 - ab_prev) * np.sqrt(alpha) / (1.0 - ab)) * x_t
    expected_variance = (1.0 - ab_prev) / (1.0 - ab) * beta

    assert mean.shape == (3, 28, 28, 1)
    assert variance.shape == (3, 1, 1, 1)
    assert log_variance.shape == (3, 1, 1, 1)
    for row, step in enumerate(t):
        np.testing.assert_allclose(np.asarray(mean[row]), expected_mean[row], rtol=1e-5, atol=1e-6,
                                   err_msg=f"t={step}")
        np.testing.assert_allclose(np.asarray(variance[row]), expected_variance[row], rtol=1e-5, atol=0,
                                   err_msg=f"t={step}")


def test_posterior_log_variance_clipped_at_first_step(coeffs, reference, batch):
    x_start, x_t, t = batch
    _, _, log_variance = diffusion.q_posterior_mean_variance(
        coeffs, jnp.asarray(x_start, jnp.float32), jnp.asarray(x_t, jnp.float32), jnp.asarray(t)
    )
    posterior_variance_1 = (1.0 - reference["ab_prev"][1]) / (1.0 - reference["ab"][1]) * reference["betas"][1]

    assert np.all(np.isfinite(np.asarray(log_variance)))
    np.testing.assert_allclose(float(log_variance[0, 0, 0, 0]), np.log(posterior_variance_1), rtol=1e-5)
    np.testing.assert_allclose(float(log_variance[1, 0, 0, 0]), np.log(posterior_variance_1), rtol=1e-5)


def test_posterior_mean_at_first_step_is_x_start(coeffs, batch):
    x_start, x_t, _ = batch
    t = jnp.zeros((3,), jnp.int32)
    mean, variance, _ = diffusion.q_posterior_mean_variance(
        coeffs, jnp.asarray(x_start, jnp.float32), jnp.asarray(x_t, jnp.float32), t
    )

    np.testing.assert_allclose(np.asarray(mean), x_start, rtol=0, atol=1e-6)
    assert np.all(np.asarray(variance) == 0.0)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_split_model_output_round_trip(prediction_type):
    # Cosine T = 20 keeps alpha-bar above 0.3 up to t = 10, where the inversions are well conditioned.
    coeffs = make_coefficients("cosine", T)
    rng = np.random.default_rng(1)
    x_start = jnp.asarray(rng.uniform(-1.0, 1.0, size=(3, 28, 28, 1)), jnp.float32)
    noise = jnp.asarray(rng.standard_normal(size=(3, 28, 28, 1)), jnp.float32)
    t = jnp.array([0, 1, 10], jnp.int32)
    x_t = diffusion.q_sample(coeffs, x_start, t, noise)
    target = diffusion.training_target(coeffs, prediction_type, x_start, noise, t)

    recovered_start, recovered_noise = diffusion.split_model_output(coeffs, prediction_type, target, x_t, t)

    np.testing.assert_allclose(np.asarray(recovered_start), np.asarray(x_start), atol=2e-4)
    np.testing.assert_allclose(np.asarray(recovered_noise), np.asarray(noise), atol=2e-4)


def test_v_target_matches_definition(coeffs, reference, batch):
    x_start, noise, t = batch
    target = diffusion.training_target(coeffs, "v", jnp.asarray(x_start, jnp.float32),
                                       jnp.asarray(noise, jnp.float32), jnp.asarray(t))
    ab = per_example(reference["ab"][t])
    expected = np.sqrt(ab) * noise - np.sqrt(1.0 - ab) * x_start

    np.testing.assert_allclose(np.asarray(target), expected, rtol=1e-5, atol=1e-6)


def test_eps_and_x_start_targets(coeffs, batch):
    x_start, noise, t = batch
    x_start = jnp.asarray(x_start, jnp.float32)
    noise = jnp.asarray(noise, jnp.float32)

    np.testing.assert_array_equal(diffusion.training_target(coeffs, "eps", x_start, noise, jnp.asarray(t)), noise)
    np.testing.assert_array_equal(diffusion.training_target(coeffs, "x_start", x_start, noise, jnp.asarray(t)),
                                  x_start)


def test_min_snr_weights_known_values(coeffs, reference):
    gamma = 5.0
    t = np.array([0, 1, 3, 5, T - 1], np.int32)
    ab = reference["ab"][t]
    snr = ab / (1.0 - ab)
    # The linear T = 20 schedule crosses SNR = 5 between t = 1 and t = 3.
    assert snr[0] > gamma
    assert snr[1] > gamma
    assert snr[2] < gamma
    clipped = np.minimum(snr, gamma)
    expected = {"eps": clipped / snr, "x_start": clipped, "v": clipped / (snr + 1.0)}

    for prediction_type, values in expected.items():
        weights = diffusion.loss_weights(coeffs, prediction_type, "min_snr", jnp.asarray(t), gamma)
        assert weights.shape == (5,)
        np.testing.assert_allclose(np.asarray(weights), values, rtol=1e-4, err_msg=prediction_type)


def test_min_snr_eps_weight_below_gamma(coeffs):
    t = jnp.array([3, 5, T - 1], jnp.int32)
    weights = diffusion.loss_weights(coeffs, "eps", "min_snr", t, 5.0)

    np.testing.assert_array_equal(np.asarray(weights), np.ones(3, np.float32))


def test_min_snr_eps_weight_at_first_step(coeffs):
    # SNR(0) = 0.995 / 0.005 = 199, so the eps weight is 5 / 199.
    weights = diffusion.loss_weights(coeffs, "eps", "min_snr", jnp.array([0], jnp.int32), 5.0)

    np.testing.assert_allclose(float(weights[0]), 5.0 / 199.0, rtol=1e-4)


def test_uniform_weights_are_one(coeffs):
    weights = diffusion.loss_weights(coeffs, "v", "uniform", jnp.array([0, 7, T - 1], jnp.int32), 5.0)

    assert weights.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(weights), np.ones(3, np.float32))


def test_simple_loss_is_mean_squared_error(coeffs, batch):
    x_start, noise, t = batch
    output = np.random.default_rng(2).standard_normal(size=x_start.shape)

    def model_fn(x_t, t_):
        return jnp.asarray(output, jnp.float32)

    loss = diffusion.diffusion_loss(coeffs, model_fn, jnp.asarray(x_start, jnp.float32), jnp.asarray(t),
                                    jnp.asarray(noise, jnp.float32))

    assert loss.shape == ()
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), np.mean((output - noise) ** 2), rtol=1e-5)


def test_x_start_loss_with_min_snr_weights(coeffs, reference, batch):
    x_start, noise, t = batch
    output = np.zeros_like(x_start)

    def model_fn(x_t, t_):
        return jnp.asarray(output, jnp.float32)

    loss = diffusion.diffusion_loss(coeffs, model_fn, jnp.asarray(x_start, jnp.float32), jnp.asarray(t),
                                    jnp.asarray(noise, jnp.float32), prediction_type="x_start",
                                    weighting="min_snr", min_snr_gamma=5.0)
    ab = reference["ab"][t]
    weights = np.minimum(ab / (1.0 - ab), 5.0)
    per_example_error = np.mean(x_start ** 2, axis=(1, 2, 3))

    np.testing.assert_allclose(float(loss), np.mean(weights * per_example_error), rtol=1e-5)


def test_loss_passes_x_t_and_t_to_model(coeffs, batch):
    x_start, noise, t = batch
    seen = {}

    def model_fn(x_t, t_):
        seen["x_t"] = x_t
        seen["t"] = t_
        return jnp.zeros_like(x_t)

    diffusion.diffusion_loss(coeffs, model_fn, jnp.asarray(x_start, jnp.float32), jnp.asarray(t),
                             jnp.asarray(noise, jnp.float32))
    expected_x_t = diffusion.q_sample(coeffs, jnp.asarray(x_start, jnp.float32), jnp.asarray(t),
                                      jnp.asarray(noise, jnp.float32))

    np.testing.assert_array_equal(np.asarray(seen["t"]), t)
    np.testing.assert_array_equal(np.asarray(seen["x_t"]), np.asarray(expected_x_t))


def test_unknown_prediction_type_raises(coeffs, batch):
    x_start, noise, t = batch
    x_start = jnp.asarray(x_start, jnp.float32)
    noise = jnp.asarray(noise, jnp.float32)
    t = jnp.asarray(t)

    with pytest.raises(ValueError, match="score"):
        diffusion.split_model_output(coeffs, "score", noise, x_start, t)
    with pytest.raises(ValueError, match="score"):
        diffusion.training_target(coeffs, "score", x_start, noise, t)
    with pytest.raises(ValueError, match="score"):
        diffusion.loss_weights(coeffs, "score", "min_snr", t, 5.0)
    with pytest.raises(ValueError, match="score"):
        diffusion.diffusion_loss(coeffs, lambda x_t, t_: x_t, x_start, t, noise, prediction_type="score")


def test_unknown_weighting_raises(coeffs):
    with pytest.raises(ValueError, match="snr_plus"):
        diffusion.loss_weights(coeffs, "eps", "snr_plus", jnp.array([0], jnp.int32), 5.0)


def test_sample_timesteps_range_and_dtype():
    t = diffusion.sample_timesteps(jax.random.PRNGKey(0), 4096, T)

    assert t.dtype == jnp.int32
    assert t.shape == (4096,)
    assert int(t.min()) == 0
    assert int(t.max()) == T - 1

"""Tests for ddpm_core.sampling: the ancestral step, frame schedule, guidance and the full sampler.

Besides a smoke-sized U-Net, the sampler runs with exact noise predictors for data concentrated
at known points, where the correct result is known in closed form.
"""

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ddpm_core.config import make_config
from ddpm_core.sampling import ddpm_sample, ddpm_step, frame_schedule, guided_model_fn, log_variance
from ddpm_core.schedule import make_betas, make_coefficients
from ddpm_core.unet import ModelApply, create_model

T = 20
SHAPE = (4, 28, 28, 1)
FRAME_EVERY = 6  # does not divide T = 20, so the schedule is padded


@dataclass(frozen=True)
class PointMassEps:
    """Exact noise predictor for data that is always the constant image ``params["center"]``.

    For x_t = sqrt(ab_t) c + sqrt(1 - ab_t) eps the true noise is (x_t - sqrt(ab_t) c) / sqrt(1 - ab_t).
    When ``params["centers"]`` is given instead, the constant is ``centers[y]``, one per label.
    """

    def __call__(self, params, x, t, y=None):
        alphas_cumprod = params["alphas_cumprod"][t][:, None, None, None]
        if y is None:
            center = params["center"]
        else:
            center = params["centers"][y][:, None, None, None]
        return (x - jnp.sqrt(alphas_cumprod) * center) / jnp.sqrt(1.0 - alphas_cumprod)


@pytest.fixture(scope="module")
def coeffs():
    return make_coefficients("linear", T)


@pytest.fixture(scope="module")
def smoke_apply():
    """ModelApply of the smoke U-Net with N(0, 0.1^2) parameters, so its output is not zero."""
    model = create_model(make_config("smoke").model, seed=0)
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(0)
    leaves = [jnp.asarray(0.1 * rng.standard_normal(leaf.shape), leaf.dtype) for leaf in leaves]
    return ModelApply(graphdef), jax.tree.unflatten(treedef, leaves)


@pytest.fixture(scope="module")
def smoke_samples(smoke_apply, coeffs):
    """Images and frames for key 0 (twice) and key 1, all from one compiled sampler."""
    apply, params = smoke_apply
    runs = {}
    for name, seed in [("first", 0), ("again", 0), ("other", 1)]:
        images, frames = ddpm_sample(apply, params, coeffs, jax.random.PRNGKey(seed), SHAPE,
                                     frame_every=FRAME_EVERY)
        runs[name] = (np.asarray(images), np.asarray(frames))
    return runs


def test_log_variance_fixed_small(coeffs):
    np.testing.assert_array_equal(np.asarray(log_variance(coeffs, "fixed_small")),
                                  np.asarray(coeffs.posterior_log_variance_clipped))


def test_log_variance_fixed_large_finite(coeffs):
    values = np.asarray(log_variance(coeffs, "fixed_large"))
    betas = make_betas("linear", T)
    alphas_cumprod = np.cumprod(1.0 - betas)
    posterior_variance_1 = betas[1] * (1.0 - alphas_cumprod[0]) / (1.0 - alphas_cumprod[1])

    assert values.shape == (T,)
    assert np.all(np.isfinite(values))
    np.testing.assert_allclose(values[0], np.log(posterior_variance_1), rtol=1e-5)
    np.testing.assert_allclose(values[1:], np.log(betas[1:]), rtol=1e-5, atol=1e-6)


def test_log_variance_unknown_raises(coeffs):
    with pytest.raises(ValueError, match="learned"):
        log_variance(coeffs, "learned")


def test_ddpm_step_last_step_no_noise(coeffs):
    x_t = 1.5 * jax.random.normal(jax.random.PRNGKey(0), SHAPE)
    log_var = log_variance(coeffs, "fixed_small")
    zero_eps = lambda x, t: jnp.zeros_like(x)  # noqa: E731

    first = ddpm_step(coeffs, zero_eps, "eps", log_var, x_t, jnp.int32(0), jax.random.PRNGKey(1))
    second = ddpm_step(coeffs, zero_eps, "eps", log_var, x_t, jnp.int32(0), jax.random.PRNGKey(2))
    # At t = 0 the posterior mean is the clipped x0 prediction: coef1 = 1 and coef2 = 0.
    alpha_bar_0 = 1.0 - make_betas("linear", T)[0]
    expected = np.clip(np.asarray(x_t, np.float64) / np.sqrt(alpha_bar_0), -1.0, 1.0)

    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
    np.testing.assert_allclose(np.asarray(first), expected, rtol=0, atol=1e-6)


def test_ddpm_step_adds_scaled_noise(coeffs):
    x_t = 1.5 * jax.random.normal(jax.random.PRNGKey(0), SHAPE)
    log_var = log_variance(coeffs, "fixed_small")
    zero_eps = lambda x, t: jnp.zeros_like(x)  # noqa: E731
    key_a, key_b = jax.random.PRNGKey(1), jax.random.PRNGKey(2)

    first = ddpm_step(coeffs, zero_eps, "eps", log_var, x_t, jnp.int32(1), key_a)
    second = ddpm_step(coeffs, zero_eps, "eps", log_var, x_t, jnp.int32(1), key_b)
    betas = make_betas("linear", T)
    alphas_cumprod = np.cumprod(1.0 - betas)
    x64 = np.asarray(x_t, np.float64)
    x_start = np.clip(x64 / np.sqrt(alphas_cumprod[1]), -1.0, 1.0)
    mean = (betas[1] * np.sqrt(alphas_cumprod[0]) / (1.0 - alphas_cumprod[1]) * x_start
            + (1.0 - alphas_cumprod[0]) * np.sqrt(1.0 - betas[1]) / (1.0 - alphas_cumprod[1]) * x64)
    std = np.sqrt(betas[1] * (1.0 - alphas_cumprod[0]) / (1.0 - alphas_cumprod[1]))
    noise = np.asarray(jax.random.normal(key_a, SHAPE), np.float64)

    assert not np.array_equal(np.asarray(first), np.asarray(second))
    np.testing.assert_allclose(np.asarray(first), mean + std * noise, rtol=0, atol=1e-5)


def test_frame_schedule_padding():
    timesteps, num_frames = frame_schedule(20, 6)

    assert num_frames == 4
    assert timesteps.dtype == np.int32
    assert timesteps.tolist() == [-1] * 4 + list(range(19, -1, -1))


def test_frame_schedule_exact_division():
    timesteps, num_frames = frame_schedule(20, 5)

    assert num_frames == 4
    assert timesteps.tolist() == list(range(19, -1, -1))


def test_frame_schedule_frame_every_above_steps():
    timesteps, num_frames = frame_schedule(20, 50)

    assert num_frames == 1
    assert timesteps.tolist() == [-1] * 30 + list(range(19, -1, -1))


def test_guided_model_fn_combines_outputs():
    def apply_fn(params, x, t, y=None):
        offset = 0.0 if y is None else y.astype(jnp.float32)[:, None, None, None]
        return params * x + offset

    x = jnp.ones((2, 28, 28, 1))
    t = jnp.zeros((2,), jnp.int32)
    labels = jnp.array([3, 5], jnp.int32)

    unconditional = guided_model_fn(apply_fn, 2.0, None, 1.5, 10)(x, t)
    conditional = guided_model_fn(apply_fn, 2.0, labels, 0.0, 10)(x, t)
    guided = guided_model_fn(apply_fn, 2.0, labels, 1.5, 10)(x, t)

    np.testing.assert_array_equal(np.asarray(unconditional), np.full((2, 28, 28, 1), 2.0))
    np.testing.assert_array_equal(np.asarray(conditional[:, 0, 0, 0]), [5.0, 7.0])
    # (1 + w) * out(y) - w * out(null) with out(null) = 2 + 10 = 12 and w = 1.5.
    np.testing.assert_allclose(np.asarray(guided[:, 0, 0, 0]), [2.5 * 5.0 - 1.5 * 12.0, 2.5 * 7.0 - 1.5 * 12.0])


def test_sampler_deterministic_for_key(smoke_samples):
    images, frames = smoke_samples["first"]
    images_again, frames_again = smoke_samples["again"]

    np.testing.assert_array_equal(images, images_again)
    np.testing.assert_array_equal(frames, frames_again)


def test_sampler_differs_across_keys(smoke_samples):
    images, _ = smoke_samples["first"]
    other_images, _ = smoke_samples["other"]

    assert np.max(np.abs(images - other_images)) > 0.1


def test_sampler_images_in_range(smoke_samples):
    images, frames = smoke_samples["first"]

    assert images.shape == SHAPE
    assert images.dtype == np.float32
    assert images.min() >= -1.0
    assert images.max() <= 1.0
    assert np.all(np.isfinite(frames))


def test_sampler_frames_shape(smoke_samples):
    _, frames = smoke_samples["first"]

    # ceil(20 / 6) = 4 frames after the initial noise.
    assert frames.shape == (4 + 1,) + SHAPE


def test_sampler_last_frame_is_images(smoke_samples):
    images, frames = smoke_samples["first"]

    np.testing.assert_array_equal(frames[-1], images)


def test_sampler_first_frame_is_initial_noise(smoke_samples):
    _, frames = smoke_samples["first"]
    key = jax.random.PRNGKey(0)
    initial = np.asarray(jax.random.normal(jax.random.fold_in(key, T), SHAPE, jnp.float32))

    # Frames are clipped to [-1, 1] like the images.
    np.testing.assert_array_equal(frames[0], np.clip(initial, -1.0, 1.0))


def test_sampler_without_frames_same_images(smoke_apply, coeffs, smoke_samples):
    apply, params = smoke_apply
    images, frames = ddpm_sample(apply, params, coeffs, jax.random.PRNGKey(0), SHAPE, frame_every=0)

    assert frames.shape == (0,) + SHAPE
    np.testing.assert_allclose(np.asarray(images), smoke_samples["first"][0], rtol=0, atol=1e-5)


def test_point_mass_fixed_large_returns_center():
    coeffs = make_coefficients("linear", T)
    params = {"alphas_cumprod": coeffs.alphas_cumprod, "center": jnp.float32(-0.6)}

    images, _ = ddpm_sample(PointMassEps(), params, coeffs, jax.random.PRNGKey(8), SHAPE, variance="fixed_large")

    np.testing.assert_allclose(np.asarray(images), -0.6, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def point_mass_run():
    """Every frame of a cosine T = 100 chain sampled with the exact predictor for the constant 0.1."""
    num_timesteps = 100
    center = 0.1
    coeffs = make_coefficients("cosine", num_timesteps)
    params = {"alphas_cumprod": coeffs.alphas_cumprod, "center": jnp.float32(center)}
    images, frames = ddpm_sample(PointMassEps(), params, coeffs, jax.random.PRNGKey(9), (8, 28, 28, 1),
                                 frame_every=1)
    return {"num_timesteps": num_timesteps, "center": center, "images": np.asarray(images),
            "frames": np.asarray(frames, np.float64)}


def test_point_mass_sampler_returns_center(point_mass_run):
    images = point_mass_run["images"]

    assert images.shape == (8, 28, 28, 1)
    np.testing.assert_allclose(images, point_mass_run["center"], rtol=0, atol=1e-4)


def test_point_mass_chain_marginals(point_mass_run):
    # With the exact noise predictor each step draws x_{t-1} from q(x_{t-1} | x_t, x_0 = c), so
    # every intermediate x follows q(x_{t-1} | x_0 = c) = N(sqrt(ab_prev[t]) c, 1 - ab_prev[t]).
    num_timesteps = point_mass_run["num_timesteps"]
    center = point_mass_run["center"]
    frames = point_mass_run["frames"]
    betas = make_betas("cosine", num_timesteps)
    alphas_cumprod_prev = np.concatenate([[1.0], np.cumprod(1.0 - betas)[:-1]])

    checked = 0
    for frame_index in range(1, num_timesteps):
        t = num_timesteps - frame_index  # the step that produced this frame
        std = np.sqrt(1.0 - alphas_cumprod_prev[t])
        # Skip frames where clipping at +-1 would bias the statistics (below 3.5 sigma).
        if std > 0.25 or std < 0.02:
            continue
        values = frames[frame_index].ravel()
        mean_tolerance = 5.0 * std / np.sqrt(values.size)
        assert abs(values.mean() - np.sqrt(alphas_cumprod_prev[t]) * center) < mean_tolerance, t
        assert abs(values.std() / std - 1.0) < 0.05, t
        checked += 1
    assert checked >= 10


def test_guided_sampler_closed_form():
    # Per-label point masses: the guided noise maps back to x0 = (1 + w) c_y - w c_null.
    coeffs = make_coefficients("linear", T)
    centers = jnp.array([-0.5, 0.25, 0.0], jnp.float32)  # label 2 is the null label
    params = {"alphas_cumprod": coeffs.alphas_cumprod, "centers": centers}
    labels = jnp.array([0, 1, 0, 1], jnp.int32)

    plain, _ = ddpm_sample(PointMassEps(), params, coeffs, jax.random.PRNGKey(3), SHAPE, labels=labels,
                           null_label=2)
    guided, _ = ddpm_sample(PointMassEps(), params, coeffs, jax.random.PRNGKey(3), SHAPE, labels=labels,
                            guidance_scale=1.0, null_label=2)
    plain = np.asarray(plain)[:, 0, 0, 0]
    guided = np.asarray(guided)[:, 0, 0, 0]

    np.testing.assert_allclose(plain, [-0.5, 0.25, -0.5, 0.25], atol=1e-4)
    np.testing.assert_allclose(guided, [-1.0, 0.5, -1.0, 0.5], atol=1e-4)

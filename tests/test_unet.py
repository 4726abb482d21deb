"""Tests for ddpm_core.unet: shapes, parameter counts, where attention sits, labels, embeddings."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ddpm_core.config import make_config
from ddpm_core.unet import (
    AttentionBlock,
    Downsample,
    ModelApply,
    Stage,
    Upsample,
    count_parameters,
    create_model,
    dropout,
    timestep_embedding,
)

# Parameter count of the smoke preset's U-Net (base 8 channels, channel multipliers (1, 2), attention
# at 14 pixels, time embedding 32), recorded from the implementation. The tests below check parts of
# it by hand.
SMOKE_PARAMETER_COUNT = 44969


def smoke_model_config(**overrides):
    return make_config("smoke", {f"model.{key}": value for key, value in overrides.items()}).model


def attention_block_size(channels):
    """GroupNorm scale and bias, qkv kernel and bias, output projection kernel and bias."""
    group_norm = 2 * channels
    qkv = channels * 3 * channels + 3 * channels
    proj = channels * channels + channels
    return group_norm + qkv + proj


def stage_attention_by_side(model):
    """List of (image side in pixels, has attention) for every Stage, down path then up path."""
    found = []
    side = 28
    for module in model.down:
        if isinstance(module, Stage):
            found.append(("down", side, module.attention is not None))
        elif isinstance(module, Downsample):
            side = -(-side // 2)
    for module in model.up:
        if isinstance(module, Stage):
            found.append(("up", side, module.attention is not None))
        elif isinstance(module, Upsample):
            side *= 2
    return found


def randomized(model, seed):
    """Copy of ``model`` with every parameter drawn from N(0, 0.2^2).

    A fresh U-Net ignores t and y because its zero-initialised output layers cut every path from
    the embedding to the output, so tests of conditioning need non-zero weights.
    """
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    # NumPy draws avoid compiling one random kernel per parameter shape.
    rng = np.random.default_rng(seed)
    leaves = [jnp.asarray(0.2 * rng.standard_normal(leaf.shape), leaf.dtype) for leaf in leaves]
    return graphdef, jax.tree.unflatten(treedef, leaves)


@pytest.fixture(scope="module")
def smoke_model():
    return create_model(smoke_model_config(), seed=0)


@pytest.fixture(scope="module")
def conditional_apply():
    """Jitted apply function and randomized parameters of a smoke model with 10 classes."""
    model = create_model(smoke_model_config(num_classes=10), seed=0)
    graphdef, params = randomized(model, seed=1)
    apply = ModelApply(graphdef)
    return jax.jit(apply), params, model


def test_output_shape_and_dtype(smoke_model):
    graphdef, params = nnx.split(smoke_model)
    apply = jax.jit(ModelApply(graphdef))
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 28, 28, 1))
    t = jnp.array([0, 3, 10, 19], jnp.int32)

    output = apply(params, x, t)

    assert output.shape == (4, 28, 28, 1)
    assert output.dtype == jnp.float32
    # The zero-initialised output convolution makes a fresh model predict exactly zero.
    assert np.all(np.asarray(output) == 0.0)


def test_smoke_parameter_count_golden(smoke_model):
    assert count_parameters(smoke_model) == SMOKE_PARAMETER_COUNT


def test_attention_blocks_add_hand_computed_size(smoke_model):
    without_attention = create_model(smoke_model_config(attention_resolutions=()), seed=0)

    # Attention at 14 pixels (16 channels) sits in one down stage and two up stages.
    assert attention_block_size(16) == 1120
    assert count_parameters(smoke_model) - count_parameters(without_attention) == 3 * attention_block_size(16)


def test_full_resolution_attention_size():
    with_attention = create_model(smoke_model_config(attention_resolutions=(28,)), seed=0)
    without_attention = create_model(smoke_model_config(attention_resolutions=()), seed=0)

    # Attention at 28 pixels (8 channels): one down stage and two up stages.
    assert count_parameters(with_attention) - count_parameters(without_attention) == 3 * attention_block_size(8)


def test_middle_attention_block_size(smoke_model):
    assert isinstance(smoke_model.mid_attention, AttentionBlock)
    assert count_parameters(smoke_model.mid_attention) == attention_block_size(16)


def test_label_embedding_adds_rows(smoke_model, conditional_apply):
    _, _, conditional_model = conditional_apply

    assert smoke_model.label_embed is None
    assert conditional_model.label_embed.embedding[...].shape == (11, 32)
    assert count_parameters(conditional_model) - count_parameters(smoke_model) == 11 * 32


def test_attention_only_at_configured_side(smoke_model):
    stages = stage_attention_by_side(smoke_model)

    assert stages == [
        ("down", 28, False),
        ("down", 14, True),
        ("up", 14, True),
        ("up", 14, True),
        ("up", 28, False),
        ("up", 28, False),
    ]


def test_attention_at_full_resolution_modules():
    model = create_model(smoke_model_config(attention_resolutions=(28,)), seed=0)
    stages = stage_attention_by_side(model)

    for path, side, has_attention in stages:
        assert has_attention == (side == 28), (path, side)
    assert sum(has_attention for _, _, has_attention in stages) == 3


@pytest.mark.parametrize("attention_resolutions", [(), (7,), (14, 7), (28, 14, 7)])
def test_attention_sides_three_levels(attention_resolutions):
    config = make_config("cpu", {"model.base_channels": 8, "model.attention_resolutions": attention_resolutions})
    model = create_model(config.model, seed=0)
    stages = stage_attention_by_side(model)

    # One residual block per level down, two per level up.
    assert [side for path, side, _ in stages if path == "down"] == [28, 14, 7]
    assert [side for path, side, _ in stages if path == "up"] == [7, 7, 14, 14, 28, 28]
    for path, side, has_attention in stages:
        assert has_attention == (side in attention_resolutions), (path, side)


def test_full_resolution_attention_forward():
    model = create_model(smoke_model_config(attention_resolutions=(28,)), seed=0)
    graphdef, params = randomized(model, seed=2)
    output = jax.jit(ModelApply(graphdef))(params, jnp.zeros((1, 28, 28, 1)), jnp.array([5], jnp.int32))

    assert output.shape == (1, 28, 28, 1)
    assert np.all(np.isfinite(np.asarray(output)))


def test_output_changes_with_label(conditional_apply):
    apply, params, _ = conditional_apply
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 28, 28, 1))
    t = jnp.array([4, 4], jnp.int32)

    out_three = apply(params, x, t, jnp.array([3, 3], jnp.int32))
    out_seven = apply(params, x, t, jnp.array([7, 7], jnp.int32))

    assert float(jnp.max(jnp.abs(out_three - out_seven))) > 1e-3


def test_missing_label_means_null_label(conditional_apply):
    apply, params, _ = conditional_apply
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 28, 28, 1))
    t = jnp.array([4, 9], jnp.int32)

    unlabeled = apply(params, x, t)
    null_label = apply(params, x, t, jnp.array([10, 10], jnp.int32))

    np.testing.assert_allclose(np.asarray(unlabeled), np.asarray(null_label), rtol=1e-6, atol=1e-6)


def test_output_changes_with_timestep(conditional_apply):
    apply, params, _ = conditional_apply
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 28, 28, 1))
    y = jnp.array([1, 1], jnp.int32)

    early = apply(params, x, jnp.array([0, 0], jnp.int32), y)
    late = apply(params, x, jnp.array([19, 19], jnp.int32), y)

    assert float(jnp.max(jnp.abs(early - late))) > 1e-3


def test_batch_items_are_independent(conditional_apply):
    apply, params, _ = conditional_apply
    x = jax.random.normal(jax.random.PRNGKey(6), (2, 28, 28, 1))
    t = jnp.array([2, 2], jnp.int32)

    pair = apply(params, x, t, jnp.array([3, 7], jnp.int32))
    first = apply(params, x, t, jnp.array([3, 3], jnp.int32))

    np.testing.assert_allclose(np.asarray(pair[0]), np.asarray(first[0]), rtol=1e-5, atol=1e-5)


def test_timestep_embedding_at_zero():
    embedding = timestep_embedding(jnp.zeros((3,), jnp.int32), 16)

    assert embedding.shape == (3, 16)
    assert embedding.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(embedding[:, :8]), np.ones((3, 8), np.float32))
    np.testing.assert_array_equal(np.asarray(embedding[:, 8:]), np.zeros((3, 8), np.float32))


def test_timestep_embedding_matches_formula():
    t = np.array([1, 7, 999])
    embedding = timestep_embedding(jnp.asarray(t, jnp.int32), 8)
    frequencies = np.exp(-math.log(10_000.0) * np.arange(4) / 4)
    angles = t[:, None] * frequencies[None, :]
    expected = np.concatenate([np.cos(angles), np.sin(angles)], axis=1)

    np.testing.assert_allclose(np.asarray(embedding), expected, atol=1e-4)


def test_timestep_embedding_odd_dim_padded():
    embedding = timestep_embedding(jnp.array([3, 5], jnp.int32), 9)

    assert embedding.shape == (2, 9)
    np.testing.assert_array_equal(np.asarray(embedding[:, -1]), np.zeros(2, np.float32))


def test_dropout_identity_without_key():
    x = jnp.arange(6.0)

    np.testing.assert_array_equal(np.asarray(dropout(x, 0.5, None)), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(dropout(x, 0.0, jax.random.PRNGKey(0))), np.asarray(x))


def test_dropout_scales_kept_values():
    x = jnp.ones((10_000,))
    dropped = np.asarray(dropout(x, 0.25, jax.random.PRNGKey(0)))
    keep_mask = dropped != 0.0

    np.testing.assert_allclose(dropped[keep_mask], 1.0 / 0.75, rtol=1e-6)
    assert abs(keep_mask.mean() - 0.75) < 0.02


def test_model_apply_is_hashable(smoke_model):
    graphdef, _ = nnx.split(smoke_model)

    assert hash(ModelApply(graphdef)) == hash(ModelApply(graphdef))
    assert ModelApply(graphdef) == ModelApply(graphdef)

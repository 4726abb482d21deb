"""U-Net noise predictor for 28x28x1 images, in Flax NNX.

The layout follows Ho et al. (2020) and Nichol and Dhariwal (2021): residual blocks with
GroupNorm and SiLU, a sinusoidal timestep embedding through an MLP added in every block,
self-attention only at the resolutions the configuration lists, and skip connections from every
down-path stage to the up path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ddpm_core.config import IMAGE_CHANNELS, ModelConfig


def timestep_embedding(t: jnp.ndarray, dim: int, max_period: float = 10_000.0) -> jnp.ndarray:
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017). t: [B] -> float32 [B, dim]."""
    half = dim // 2
    frequencies = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = t.astype(jnp.float32)[:, None] * frequencies[None, :]
    embedding = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
    if dim % 2:
        embedding = jnp.pad(embedding, ((0, 0), (0, 1)))
    return embedding


def dropout(x: jnp.ndarray, rate: float, key: jax.Array | None) -> jnp.ndarray:
    """Inverted dropout; the identity when ``key`` is None (evaluation) or ``rate`` is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


class ResBlock(nnx.Module):
    """GroupNorm, SiLU, 3x3 conv, plus the projected time embedding, then again, with a residual path."""

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, config: ModelConfig, *, rngs: nnx.Rngs):
        self.norm1 = nnx.GroupNorm(in_channels, num_groups=config.num_groups, rngs=rngs)
        self.conv1 = nnx.Conv(in_channels, out_channels, (3, 3), rngs=rngs)
        self.embed_proj = nnx.Linear(embed_dim, out_channels, rngs=rngs)
        self.norm2 = nnx.GroupNorm(out_channels, num_groups=config.num_groups, rngs=rngs)
        # Zero init makes each block start as the identity, which steadies early training.
        self.conv2 = nnx.Conv(out_channels, out_channels, (3, 3), kernel_init=nnx.initializers.zeros, rngs=rngs)
        self.skip = nnx.Conv(in_channels, out_channels, (1, 1), rngs=rngs) if in_channels != out_channels else None
        self.dropout_rate = config.dropout

    def __call__(self, x: jnp.ndarray, embedding: jnp.ndarray, key: jax.Array | None) -> jnp.ndarray:
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = h + self.embed_proj(nnx.silu(embedding))[:, None, None, :]
        h = dropout(nnx.silu(self.norm2(h)), self.dropout_rate, key)
        h = self.conv2(h)
        residual = x if self.skip is None else self.skip(x)
        return residual + h


class AttentionBlock(nnx.Module):
    """Multi-head self-attention over all H*W positions, with a residual path."""

    def __init__(self, channels: int, config: ModelConfig, *, rngs: nnx.Rngs):
        self.norm = nnx.GroupNorm(channels, num_groups=config.num_groups, rngs=rngs)
        self.qkv = nnx.Linear(channels, 3 * channels, rngs=rngs)
        self.proj = nnx.Linear(channels, channels, kernel_init=nnx.initializers.zeros, rngs=rngs)
        self.num_heads = config.num_heads

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        batch, height, width, channels = x.shape
        head_dim = channels // self.num_heads
        qkv = self.qkv(self.norm(x)).reshape(batch, height * width, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, L, heads, head_dim]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        weights = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, height, width, channels)
        return x + self.proj(out)


class Downsample(nnx.Module):
    """Strided 3x3 convolution halving H and W (28 -> 14 -> 7)."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(channels, channels, (3, 3), strides=(2, 2), rngs=rngs)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour doubling of H and W followed by a 3x3 convolution."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(channels, channels, (3, 3), rngs=rngs)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


class Stage(nnx.Module):
    """One residual block, optionally followed by self-attention."""

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, attention: bool, config: ModelConfig,
                 *, rngs: nnx.Rngs):
        self.res = ResBlock(in_channels, out_channels, embed_dim, config, rngs=rngs)
        self.attention = AttentionBlock(out_channels, config, rngs=rngs) if attention else None

    def __call__(self, x: jnp.ndarray, embedding: jnp.ndarray, key: jax.Array | None) -> jnp.ndarray:
        x = self.res(x, embedding, key)
        if self.attention is not None:
            x = self.attention(x)
        return x


class UNet(nnx.Module):
    """Predict the network target (noise by default) from x_t [B, 28, 28, 1] and t [B].

    With ``config.num_classes > 0`` the model also takes integer labels ``y`` [B]; the extra label
    ``num_classes`` means "no label" and serves classifier-free guidance.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        base = config.base_channels
        embed_dim = config.time_embed_dim
        sides = config.resolutions()

        # 1. Timestep (and label) embedding.
        self.time_mlp1 = nnx.Linear(base, embed_dim, rngs=rngs)
        self.time_mlp2 = nnx.Linear(embed_dim, embed_dim, rngs=rngs)
        self.label_embed = (
            nnx.Embed(config.num_classes + 1, embed_dim, rngs=rngs) if config.num_classes > 0 else None
        )
        self.conv_in = nnx.Conv(IMAGE_CHANNELS, base, (3, 3), rngs=rngs)

        # 2. Down path: every stage output is kept as a skip connection.
        down: list[nnx.Module] = []
        skip_channels = [base]
        channels = base
        for level, mult in enumerate(config.channel_mults):
            out_channels = base * mult
            for _ in range(config.num_res_blocks):
                down.append(Stage(channels, out_channels, embed_dim, sides[level] in config.attention_resolutions,
                                  config, rngs=rngs))
                channels = out_channels
                skip_channels.append(channels)
            if level < len(config.channel_mults) - 1:
                down.append(Downsample(channels, rngs=rngs))
                skip_channels.append(channels)
        self.down = nnx.List(down)

        # 3. Middle: residual, attention, residual at the lowest resolution.
        self.mid1 = ResBlock(channels, channels, embed_dim, config, rngs=rngs)
        self.mid_attention = AttentionBlock(channels, config, rngs=rngs)
        self.mid2 = ResBlock(channels, channels, embed_dim, config, rngs=rngs)

        # 4. Up path: each stage consumes one skip connection.
        up: list[nnx.Module] = []
        for level in reversed(range(len(config.channel_mults))):
            out_channels = base * config.channel_mults[level]
            for _ in range(config.num_res_blocks + 1):
                up.append(Stage(channels + skip_channels.pop(), out_channels, embed_dim,
                                sides[level] in config.attention_resolutions, config, rngs=rngs))
                channels = out_channels
            if level > 0:
                up.append(Upsample(channels, rngs=rngs))
        self.up = nnx.List(up)

        self.norm_out = nnx.GroupNorm(channels, num_groups=config.num_groups, rngs=rngs)
        self.conv_out = nnx.Conv(channels, IMAGE_CHANNELS, (3, 3), kernel_init=nnx.initializers.zeros, rngs=rngs)

    def __call__(self, x: jnp.ndarray, t: jnp.ndarray, y: jnp.ndarray | None = None,
                 dropout_key: jax.Array | None = None) -> jnp.ndarray:
        """Args:
          x: float32 [B, 28, 28, 1], the noisy images x_t.
          t: int32 [B], timesteps in {0, ..., T-1}.
          y: int32 [B] labels in {0, ..., num_classes}, where num_classes means "no label". Required
            when the model is class-conditional, ignored otherwise.
          dropout_key: PRNG key for dropout during training; None disables dropout.

        Returns:
          float32 [B, 28, 28, 1].
        """
        embedding = self.time_mlp2(nnx.silu(self.time_mlp1(timestep_embedding(t, self.config.base_channels))))
        if self.label_embed is not None:
            if y is None:
                y = jnp.full(t.shape, self.config.num_classes, dtype=jnp.int32)
            embedding = embedding + self.label_embed(y)

        block_index = 0

        def next_key() -> jax.Array | None:
            nonlocal block_index
            block_index += 1
            return None if dropout_key is None else jax.random.fold_in(dropout_key, block_index)

        h = self.conv_in(x)
        skips = [h]
        for module in self.down:
            h = module(h, embedding, next_key()) if isinstance(module, Stage) else module(h)
            skips.append(h)

        h = self.mid1(h, embedding, next_key())
        h = self.mid_attention(h)
        h = self.mid2(h, embedding, next_key())

        for module in self.up:
            if isinstance(module, Stage):
                h = module(jnp.concatenate([h, skips.pop()], axis=-1), embedding, next_key())
            else:
                h = module(h)

        return self.conv_out(nnx.silu(self.norm_out(h)))


@dataclass(frozen=True)
class ModelApply:
    """Hashable pure function ``(params, x, t, y, dropout_key) -> output`` of one model graph.

    Being hashable, it can be a static argument of jitted functions such as the samplers.
    """

    graphdef: nnx.GraphDef

    def __call__(self, params: Any, x: jnp.ndarray, t: jnp.ndarray, y: jnp.ndarray | None = None,
                 dropout_key: jax.Array | None = None) -> jnp.ndarray:
        model: UNet = nnx.merge(self.graphdef, params)
        return model(x, t, y, dropout_key)


def create_model(config: ModelConfig, seed: int) -> UNet:
    """Build a U-Net with parameters initialised from ``seed``."""
    return UNet(config, rngs=nnx.Rngs(params=seed))


def count_parameters(model: nnx.Module) -> int:
    """Number of scalar parameters."""
    return sum(int(leaf.size) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))

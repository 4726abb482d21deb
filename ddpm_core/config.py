"""Typed, validated configuration of a pipeline run, and the named presets.

Every field has a range. Pydantic checks them when a configuration is built, so a bad value is
rejected before any work starts, with the field name and the allowed range in the message.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

IMAGE_SIZE = 28
IMAGE_CHANNELS = 1


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    """U-Net shape. Resolutions are image sides in pixels (28, 14, 7 for MNIST)."""

    base_channels: int = Field(32, ge=8, le=512, description="channels at the first resolution")
    channel_mults: tuple[int, ...] = Field(
        (1, 2, 2), min_length=1, max_length=3, description="channel multiplier per resolution level"
    )
    num_res_blocks: int = Field(1, ge=1, le=4, description="residual blocks per level on the way down")
    attention_resolutions: tuple[int, ...] = Field(
        (7,), description="image sides (pixels) with self-attention; 28 is allowed but costly"
    )
    num_heads: int = Field(1, ge=1, le=16, description="attention heads")
    num_groups: int = Field(8, ge=1, le=64, description="GroupNorm groups; must divide every channel count")
    time_embed_dim: int = Field(128, ge=16, le=2048, description="width of the timestep embedding MLP")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout rate in residual blocks")
    num_classes: int = Field(0, ge=0, le=1000, description="class labels to condition on; 0 is unconditional")

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        for mult in self.channel_mults:
            if not 1 <= mult <= 8:
                raise ValueError(f"model.channel_mults entries must be in [1, 8], got {mult}")
            channels = self.base_channels * mult
            if channels % self.num_groups:
                raise ValueError(
                    f"model.num_groups={self.num_groups} must divide every channel count, but not {channels}"
                )
            if channels % self.num_heads:
                raise ValueError(
                    f"model.num_heads={self.num_heads} must divide every channel count, but not {channels}"
                )
        sides = self.resolutions()
        for side in self.attention_resolutions:
            if side not in sides:
                raise ValueError(f"model.attention_resolutions entries must be among {sides}, got {side}")
        return self

    def resolutions(self) -> tuple[int, ...]:
        """Image side in pixels at each level, e.g. (28, 14, 7)."""
        sides = [IMAGE_SIZE]
        for _ in self.channel_mults[1:]:
            sides.append(sides[-1] // 2)
        return tuple(sides)


class DiffusionConfig(_Section):
    """Forward process and prediction target."""

    num_timesteps: int = Field(1000, ge=10, le=4000, description="T, number of diffusion steps")
    schedule: Literal["linear", "cosine"] = Field("linear", description="beta schedule")
    prediction_type: Literal["eps", "x_start", "v"] = Field("eps", description="what the network predicts")
    loss_weighting: Literal["uniform", "min_snr"] = Field(
        "uniform", description="per-timestep loss weight; min_snr clips the SNR at min_snr_gamma"
    )
    min_snr_gamma: float = Field(5.0, gt=0.0, le=100.0, description="SNR clip of the min_snr weighting")


class TrainConfig(_Section):
    """Optimiser, EMA and run length."""

    steps: int = Field(2000, ge=1, le=10_000_000, description="optimiser steps")
    batch_size: int = Field(64, ge=1, le=8192, description="images per optimiser step")
    learning_rate: float = Field(1e-3, gt=0.0, le=1.0, description="peak learning rate")
    warmup_steps: int = Field(100, ge=0, le=1_000_000, description="linear learning-rate warm-up, in steps")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "cosine", description="after warm-up: constant, or cosine decay to 10 % of the peak at the last step"
    )
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW decoupled weight decay")
    grad_clip_norm: float = Field(1.0, gt=0.0, le=1000.0, description="global gradient-norm clip")
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0, description="maximum EMA decay")
    ema_warmup: bool = Field(True, description="grow the EMA decay as (1 + step) / (10 + step) up to ema_decay")
    steps_per_dispatch: int = Field(
        1, ge=1, le=1000, description="optimiser steps compiled into one call (lax.scan)"
    )
    log_every: int = Field(50, ge=1, le=1_000_000, description="steps between metric logs")
    checkpoint_every: int = Field(500, ge=1, le=10_000_000, description="steps between checkpoints")
    label_dropout: float = Field(
        0.1, ge=0.0, le=1.0, description="share of labels replaced by 'no label' (class-conditional models only)"
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seed of parameters, batches and noise")

    @model_validator(mode="after")
    def _check_intervals(self) -> TrainConfig:
        for name in ("steps", "log_every", "checkpoint_every"):
            value = getattr(self, name)
            if value % self.steps_per_dispatch:
                raise ValueError(
                    f"train.{name}={value} must be a multiple of train.steps_per_dispatch={self.steps_per_dispatch}"
                )
        return self


SamplerName = Literal["ddpm", "ddpm_large", "ddim", "dpm_solver_pp"]


class SampleConfig(_Section):
    """Sampling and rendering after training."""

    num_samples: int = Field(64, ge=1, le=100_000, description="images to generate")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="sampling seed")
    sampler: SamplerName = Field("ddpm", description="sampler of the GIF and grid")
    steps: int = Field(0, ge=0, le=4000, description="sampling steps of ddim and dpm_solver_pp; 0 is the sampler's default")
    frame_every: int = Field(20, ge=1, le=4000, description="keep one GIF frame every this many steps")
    grid_cols: int = Field(8, ge=1, le=64, description="images per row in the GIF and PNG grid")
    upscale: int = Field(3, ge=1, le=16, description="pixel upscale factor in the GIF and PNG")
    frame_duration_ms: int = Field(60, ge=10, le=10_000, description="GIF frame duration, in milliseconds")
    final_hold_ms: int = Field(1500, ge=0, le=60_000, description="extra display time of the GIF's final frame, in milliseconds")


class EvalConfig(_Section):
    """Sample-quality evaluation with an MNIST classifier, deciding champion/challenger promotion."""

    enabled: bool = Field(True, description="evaluate each new model version")
    num_samples: int = Field(1000, ge=10, le=100_000, description="samples n compared with n test images")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="sampling seed of the evaluation")
    sampler: SamplerName = Field("ddim", description="sampler used for the evaluation samples")
    steps: int = Field(50, ge=0, le=4000, description="sampling steps of ddim and dpm_solver_pp; 0 is the sampler's default")
    guidance_scale: float = Field(
        2.0, ge=0.0, le=20.0,
        description="classifier-free guidance of the per-digit samples of class-conditional models",
    )


class PipelineConfig(_Section):
    """The whole configuration of ``train_pipeline``."""

    preset: str = Field("custom", description="name of the preset this configuration started from")
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    eval: EvalConfig = EvalConfig()

    def flat(self) -> dict[str, Any]:
        """Flatten to ``{"train.batch_size": 64, ...}`` for logging as MLflow parameters."""
        return flatten(self.model_dump())


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts into dotted keys; tuples become comma-separated strings."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (tuple, list)):
            flat[name] = ",".join(str(item) for item in value)
        else:
            flat[name] = value
    return flat


PRESETS: dict[str, dict[str, Any]] = {
    # Seconds on a laptop CPU: a tiny network and a short chain, for tests.
    "smoke": {
        "model": {"base_channels": 8, "channel_mults": (1, 2), "num_groups": 4, "time_embed_dim": 32,
                  "attention_resolutions": (14,)},
        "diffusion": {"num_timesteps": 20},
        "train": {"steps": 8, "batch_size": 8, "warmup_steps": 2, "steps_per_dispatch": 2,
                  "log_every": 4, "checkpoint_every": 4},
        "sample": {"num_samples": 4, "grid_cols": 2, "frame_every": 5, "upscale": 1,
                   "final_hold_ms": 200},
        "eval": {"enabled": False},
    },
    # The README's main job: about a quarter of an hour on a 2-core CPU.
    # Recipe chosen with bench/recipe_compare.py (see docs/benchmarks.md).
    "cpu": {
        "model": {"base_channels": 16, "channel_mults": (1, 2, 2), "num_groups": 8, "attention_resolutions": (7,),
                  "num_classes": 10},
        "diffusion": {"num_timesteps": 500, "schedule": "linear", "prediction_type": "x_start"},
        "train": {"steps": 3600, "batch_size": 64, "learning_rate": 2e-3, "warmup_steps": 100,
                  "ema_decay": 0.995, "steps_per_dispatch": 4, "log_every": 100,
                  "checkpoint_every": 1200},
        "sample": {"num_samples": 64, "frame_every": 10},
        "eval": {"num_samples": 1000, "sampler": "ddim", "steps": 25},
    },
    # Full-quality recipe for a GPU worker.
    "gpu": {
        "model": {"base_channels": 64, "channel_mults": (1, 2, 2), "num_res_blocks": 2,
                  "attention_resolutions": (14, 7), "num_heads": 4, "num_groups": 32,
                  "time_embed_dim": 256, "dropout": 0.1},
        "diffusion": {"num_timesteps": 1000, "schedule": "cosine"},
        "train": {"steps": 50_000, "batch_size": 256, "learning_rate": 2e-4, "warmup_steps": 1000,
                  "ema_decay": 0.9999, "steps_per_dispatch": 50, "log_every": 250,
                  "checkpoint_every": 5000},
        "sample": {"num_samples": 64, "frame_every": 20},
        "eval": {"num_samples": 10_000, "sampler": "ddim", "steps": 100},
    },
}


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def make_config(preset: str = "cpu", overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Build a validated configuration from a preset plus overrides.

    Args:
      preset: one of ``PRESETS``.
      overrides: nested (``{"train": {"steps": 10}}``) or dotted (``{"train.steps": 10}``) values.

    Raises:
      ValueError: unknown preset, unknown field, or a value outside its range. The message names
        the field and the allowed range.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    values = _merge({"preset": preset}, PRESETS[preset])
    for key, value in (overrides or {}).items():
        if isinstance(value, dict):
            values = _merge(values, {key: value})
            continue
        *sections, field = key.split(".")
        nested: dict[str, Any] = {field: value}
        for section in reversed(sections):
            nested = {section: nested}
        values = _merge(values, nested)
    try:
        return PipelineConfig.model_validate(values)
    except ValidationError as error:
        raise ValueError(describe_validation_error(error)) from None


def describe_validation_error(error: ValidationError) -> str:
    """Turn a pydantic error into one line per field: ``train.steps: Input should be >= 1 (got 0)``."""
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "config"
        if item["type"] == "value_error":
            # A check across fields: its message already names the fields and values.
            lines.append(f"{field}: {item['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{field}: {item['msg']} (got {item.get('input')!r})")
    return "invalid configuration:\n  " + "\n  ".join(lines)

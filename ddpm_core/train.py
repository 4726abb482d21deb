"""Jitted training: optimiser, EMA, and several optimiser steps per dispatch.

The whole training set lives on the device as uint8 [N, 28, 28, 1]. Each step draws its batch
indices, timesteps and noise inside the compiled function from ``fold_in(state.key, step)``, so
there is no Python data loader in the loop. A run resumed from a checkpoint therefore draws
exactly the batches an uninterrupted run would have drawn.

Training is data-parallel over every device (see ``ddpm_core.parallel``): the state and the
training set are replicated, and each step's batch is sharded over the mesh axis ``"data"``. The
draws do not depend on the device count, so one and several devices train on the same batches.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from ddpm_core.config import PipelineConfig, TrainConfig
from ddpm_core.diffusion import diffusion_loss, sample_timesteps
from ddpm_core.parallel import (
    check_batch_size,
    constrain_batch,
    make_mesh,
    maybe_initialize_distributed,
    put_replicated,
    replicated,
    shard_state,
)
from ddpm_core.schedule import DiffusionCoefficients, make_coefficients
from ddpm_core.unet import ModelApply, create_model

logger = logging.getLogger(__name__)

# Key streams folded into the seed, so parameters, training and sampling never share a key.
TRAIN_KEY_STREAM = 1


@struct.dataclass
class TrainState:
    """Everything training needs to continue exactly where it stopped."""

    step: jnp.ndarray  # int32 [], optimiser steps done
    params: Any  # nnx.State of the raw weights
    ema_params: Any  # nnx.State of the EMA weights, used for sampling and registration
    opt_state: Any
    key: jnp.ndarray  # uint32 [2], base key of the training stream


def make_lr_schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warm-up to the peak rate, then constant or cosine decay to 10 % of the peak."""
    if config.lr_schedule == "constant":
        after = optax.constant_schedule(config.learning_rate)
    elif config.lr_schedule == "cosine":
        after = optax.cosine_decay_schedule(
            config.learning_rate, decay_steps=max(config.steps - config.warmup_steps, 1), alpha=0.1
        )
    else:
        raise ValueError(f"unknown lr_schedule {config.lr_schedule!r}; choose 'constant' or 'cosine'")
    if config.warmup_steps == 0:
        return after
    warmup = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
    return optax.join_schedules([warmup, after], boundaries=[config.warmup_steps])


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm gradient clipping followed by AdamW on the learning-rate schedule."""
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip_norm),
        optax.adamw(make_lr_schedule(config), weight_decay=config.weight_decay),
    )


def ema_decay_at(config: TrainConfig, step: jnp.ndarray) -> jnp.ndarray:
    """EMA decay at ``step``: ``min(ema_decay, (1 + step) / (10 + step))`` with warm-up, else ``ema_decay``."""
    if not config.ema_warmup:
        return jnp.asarray(config.ema_decay, jnp.float32)
    step = step.astype(jnp.float32)
    return jnp.minimum(config.ema_decay, (1.0 + step) / (10.0 + step))


@dataclass(frozen=True)
class Trainer:
    """The static parts of training: model graph, optimiser and diffusion coefficients."""

    config: PipelineConfig
    apply: ModelApply
    optimizer: optax.GradientTransformation
    coeffs: DiffusionCoefficients
    # Devices the batch is sharded over; None trains without sharding constraints.
    mesh: Mesh | None = None

    def train_step(self, state: TrainState, images: jnp.ndarray, labels: jnp.ndarray) -> tuple[TrainState, dict]:
        """Take one optimiser step on a batch drawn from images uint8 [N, 28, 28, 1] and labels int32 [N]."""
        config = self.config
        batch_size = config.train.batch_size

        # 1. Keys for this step, one per purpose.
        step_key = jax.random.fold_in(state.key, state.step)
        batch_key, t_key, noise_key, dropout_key, label_key = jax.random.split(step_key, 5)

        # 2. Batch drawn on the device, scaled from uint8 to [-1, 1]. The draws cover the global
        # batch, then each device keeps its slice of the "data" axis.
        index = jax.random.randint(batch_key, (batch_size,), 0, images.shape[0])
        index = constrain_batch(index, self.mesh)
        x_start = images[index].astype(jnp.float32) / 127.5 - 1.0
        t = sample_timesteps(t_key, batch_size, self.coeffs.num_timesteps)
        noise = jax.random.normal(noise_key, x_start.shape, jnp.float32)
        x_start, t, noise = constrain_batch((x_start, t, noise), self.mesh)
        y = None
        if config.model.num_classes > 0:
            y = labels[index].astype(jnp.int32)
            drop = jax.random.bernoulli(label_key, config.train.label_dropout, y.shape)
            y = constrain_batch(jnp.where(drop, config.model.num_classes, y), self.mesh)

        # 3. Loss and gradient.
        use_dropout = config.model.dropout > 0.0

        def loss_fn(params):
            def model_fn(x_t, t_):
                return self.apply(params, x_t, t_, y, dropout_key if use_dropout else None)

            return diffusion_loss(self.coeffs, model_fn, x_start, t, noise, config.diffusion.prediction_type,
                                  config.diffusion.loss_weighting, config.diffusion.min_snr_gamma)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)

        # 4. Optimiser and EMA updates.
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay_at(config.train, state.step)
        ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)

        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state)
        return new_state, metrics

    def train_chunk(self, state: TrainState, images: jnp.ndarray, labels: jnp.ndarray) -> tuple[TrainState, dict]:
        """``steps_per_dispatch`` optimiser steps in one ``lax.scan``; metrics are [steps_per_dispatch]."""

        steps = self.config.train.steps_per_dispatch
        # NOTE: on XLA:CPU (jaxlib 0.10.2) a while loop around the backward pass, even a fully
        # unrolled lax.scan, ran 10-20x slower than the same step outside a loop. On the CPU the
        # steps are therefore traced one after another, which grows compile time with the count.
        if steps == 1 or jax.default_backend() == "cpu":
            history = []
            for _ in range(steps):
                state, metrics = self.train_step(state, images, labels)
                history.append(metrics)
            return state, jax.tree.map(lambda *values: jnp.stack(values), *history)

        def body(carry, _):
            return self.train_step(carry, images, labels)

        return jax.lax.scan(body, state, None, length=steps)


def create_trainer(config: PipelineConfig) -> tuple[Trainer, TrainState]:
    """Initialise the model, optimiser and training state from ``config.train.seed``.

    The trainer shards batches over every device, and the state is replicated on all of them.
    When ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` are set, this
    first joins the multi-process run, so it must then come before any other JAX computation.

    Raises:
      ValueError: ``train.batch_size`` is not divisible by the number of devices.
    """
    maybe_initialize_distributed()
    mesh = make_mesh()
    check_batch_size(config.train.batch_size, mesh)
    model = create_model(config.model, config.train.seed)
    graphdef, params = nnx.split(model)
    optimizer = make_optimizer(config.train)
    coeffs = make_coefficients(config.diffusion.schedule, config.diffusion.num_timesteps)
    trainer = Trainer(config, ModelApply(graphdef), optimizer, coeffs, mesh)
    state = TrainState(
        step=jnp.asarray(0, jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=optimizer.init(params),
        key=jax.random.fold_in(jax.random.PRNGKey(config.train.seed), TRAIN_KEY_STREAM),
    )
    return trainer, shard_state(state, mesh)


def compile_train_chunk(trainer: Trainer) -> Callable:
    """Jit ``train_chunk``, donating the old state so its buffers are reused.

    With a mesh, the new state and the metrics come back replicated on every device.

    Raises:
      ValueError: ``train.batch_size`` is not divisible by the number of devices of the mesh.
    """
    if trainer.mesh is None:
        return jax.jit(trainer.train_chunk, donate_argnums=0)
    check_batch_size(trainer.config.train.batch_size, trainer.mesh)
    return jax.jit(trainer.train_chunk, donate_argnums=0, out_shardings=replicated(trainer.mesh))


@dataclass
class LogRecord:
    """Metrics averaged over one log interval."""

    step: int
    loss: float
    grad_norm: float
    learning_rate: float
    images_per_second: float


def run_training(
    trainer: Trainer,
    state: TrainState,
    images: np.ndarray,
    labels: np.ndarray,
    on_log: Callable[[LogRecord], None] | None = None,
    on_chunk: Callable[[int], None] | None = None,
    on_checkpoint: Callable[[TrainState], None] | None = None,
) -> TrainState:
    """Train from ``state.step`` up to ``config.train.steps``.

    Args:
      images: uint8 [N, 28, 28, 1]; labels: int [N].
      on_log: called every ``log_every`` steps with averaged metrics (this syncs with the device).
      on_chunk: called after each dispatch with the number of steps done, without syncing.
      on_checkpoint: called every ``checkpoint_every`` steps and at the end with the state.
    """
    train_config = trainer.config.train
    chunk = train_config.steps_per_dispatch
    step = int(state.step)
    if step % chunk:
        raise ValueError(f"cannot resume at step {step}: not a multiple of steps_per_dispatch={chunk}")
    train_chunk = compile_train_chunk(trainer)
    if trainer.mesh is None:
        images_device = jnp.asarray(images, jnp.uint8)
        labels_device = jnp.asarray(labels, jnp.int32)
    else:
        state = shard_state(state, trainer.mesh)
        images_device = put_replicated(np.asarray(images, np.uint8), trainer.mesh)
        labels_device = put_replicated(np.asarray(labels, np.int32), trainer.mesh)
    schedule = make_lr_schedule(train_config)

    # 1. Compile once, announced with its duration.
    started = time.perf_counter()
    compiled = train_chunk.lower(state, images_device, labels_device).compile()
    logger.info("Compiled the training step (%d steps per dispatch) in %.1f s", chunk, time.perf_counter() - started)

    # 2. Loop over dispatches; the device is read only at log points.
    pending: list[dict] = []
    interval_start = time.perf_counter()
    interval_steps = 0
    while step < train_config.steps:
        state, metrics = compiled(state, images_device, labels_device)
        step += chunk
        interval_steps += chunk
        pending.append(metrics)
        if on_chunk is not None:
            on_chunk(step)
        at_end = step >= train_config.steps
        if step % train_config.log_every == 0 or at_end:
            losses = np.concatenate([np.asarray(m["loss"]) for m in pending])
            grad_norms = np.concatenate([np.asarray(m["grad_norm"]) for m in pending])
            elapsed = time.perf_counter() - interval_start
            record = LogRecord(
                step=step,
                loss=float(losses.mean()),
                grad_norm=float(grad_norms.mean()),
                learning_rate=float(schedule(step - 1)),
                images_per_second=interval_steps * train_config.batch_size / max(elapsed, 1e-9),
            )
            if not np.isfinite(record.loss):
                raise FloatingPointError(f"training loss is {record.loss} at step {step}; lower train.learning_rate")
            if on_log is not None:
                on_log(record)
            pending = []
            interval_start = time.perf_counter()
            interval_steps = 0
        if on_checkpoint is not None and (step % train_config.checkpoint_every == 0 or at_end):
            on_checkpoint(state)
    return state

"""Checkpoints with orbax-checkpoint.

Two layouts:
- Training checkpoints (``<dir>/<step>/``): the whole ``TrainState`` (parameters, EMA parameters,
  optimiser state, step, key) plus the configuration as JSON. Restoring one and training on gives
  the same result as never stopping.
- Exported models (``<dir>/``): the EMA parameters plus the configuration, for sampling and for
  the registered MLflow model.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from ddpm_core.config import PipelineConfig
from ddpm_core.train import Trainer, TrainState, create_trainer
from ddpm_core.unet import ModelApply, create_model

logger = logging.getLogger(__name__)

MAX_CHECKPOINTS_KEPT = 2
CONFIG_FILE = "config.json"
PARAMS_DIR = "ema_params"


def _manager(directory: str) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=MAX_CHECKPOINTS_KEPT, enable_async_checkpointing=False,
                                           create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=("state", "config"))


def save_checkpoint(directory: str, state: TrainState, config: PipelineConfig) -> int:
    """Save ``state`` and ``config`` under ``directory/<step>``; return the step.

    Writing is atomic (orbax writes to a temporary folder and renames it), so a crash never leaves
    a half-written checkpoint that ``latest_step`` would pick.
    """
    step = int(state.step)
    with _manager(directory) as manager:
        if step in manager.all_steps():
            return step
        manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    config=ocp.args.JsonSave(config.model_dump(mode="json"))),
        )
        manager.wait_until_finished()
    logger.info("Saved checkpoint at step %d in %s", step, directory)
    return step


def latest_step(directory: str) -> int | None:
    """Step of the newest complete checkpoint in ``directory``, or None if there is none."""
    if not os.path.isdir(directory):
        return None
    with _manager(directory) as manager:
        return manager.latest_step()


def read_checkpoint_config(directory: str, step: int | None = None) -> PipelineConfig:
    """Configuration stored with a checkpoint (the latest one when ``step`` is None)."""
    step = latest_step(directory) if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint found in {directory}")
    with _manager(directory) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return PipelineConfig.model_validate(restored["config"])


def restore_checkpoint(directory: str, config: PipelineConfig, step: int | None = None) -> tuple[Trainer, TrainState]:
    """Rebuild the trainer from ``config`` and restore its state from ``directory``.

    Raises:
      FileNotFoundError: there is no checkpoint.
      ValueError: the checkpoint was written with another model or diffusion configuration.
    """
    step = latest_step(directory) if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint found in {directory}")
    stored = read_checkpoint_config(directory, step)
    if stored.model != config.model or stored.diffusion != config.diffusion:
        raise ValueError(
            f"checkpoint in {directory} was trained with another model or diffusion configuration; "
            "use a new output folder or the configuration stored with it"
        )
    trainer, template = create_trainer(config)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    with _manager(directory) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    logger.info("Restored checkpoint at step %d from %s", step, directory)
    return trainer, restored["state"]


def export_model(directory: str, ema_params: Any, config: PipelineConfig) -> str:
    """Write the EMA parameters and the configuration to ``directory`` (replaced if present)."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    params_path = os.path.join(directory, PARAMS_DIR)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(params_path, ema_params, force=True)
        checkpointer.wait_until_finished()
    with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as handle:
        json.dump(config.model_dump(mode="json"), handle, indent=2)
    return directory


def load_model(directory: str) -> tuple[ModelApply, Any, PipelineConfig]:
    """Load an exported model: its apply function, EMA parameters and configuration."""
    directory = os.path.abspath(directory)
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no exported model in {directory}: {CONFIG_FILE} is missing")
    with open(config_path, encoding="utf-8") as handle:
        config = PipelineConfig.model_validate(json.load(handle))
    graphdef, template = nnx.split(create_model(config.model, seed=0))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(os.path.join(directory, PARAMS_DIR), abstract)
    return ModelApply(graphdef), params, config

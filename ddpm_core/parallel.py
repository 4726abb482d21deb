"""Data-parallel training helpers: the device mesh, placement of arrays, and multi-host start-up.

Training uses a one-dimensional mesh over every device (all local devices, and with
``jax.distributed`` the devices of every process) with the batch axis ``"data"``. Parameters,
optimiser state and the uint8 training set are replicated on every device. The train step draws
the global batch as before and constrains it to be sharded over ``"data"``, so each device runs
the network on ``batch_size / device_count`` images and XLA all-reduces the gradients. With one
device the mesh has one entry and the constraints change nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

DATA_AXIS = "data"

# Environment variables read by maybe_initialize_distributed. jax 0.10.2 reads
# JAX_COORDINATOR_ADDRESS itself, but not the process count or id, which it only detects on
# Slurm, Open MPI, Kubernetes and Cloud TPU; these names follow the same pattern.
COORDINATOR_ADDRESS_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"

# Number of CPU devices to split the host into (see configure_cpu_devices).
CPU_DEVICES_ENV = "DDPM_CPU_DEVICES"
HOST_DEVICE_FLAG = "--xla_force_host_platform_device_count"
MAX_AUTO_CPU_DEVICES = 8


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not Linux
        return max(os.cpu_count() or 1, 1)


def cpu_device_count(env: Mapping[str, str] | None = None, cores: int | None = None) -> int:
    """Return the number of CPU devices that ``configure_cpu_devices`` requests from XLA.

    ``DDPM_CPU_DEVICES`` wins when set. Otherwise the usable cores rounded down to a power of two,
    at most 8, so that the power-of-two batch sizes of the presets split evenly.

    Raises:
      ValueError: ``DDPM_CPU_DEVICES`` is not an integer of at least 1.
    """
    env = os.environ if env is None else env
    value = _read_int(env, CPU_DEVICES_ENV)
    if value is not None:
        if value < 1:
            raise ValueError(f"{CPU_DEVICES_ENV} must be at least 1, got {value}")
        return value
    cores = usable_cores() if cores is None else cores
    count = 1
    while count * 2 <= min(cores, MAX_AUTO_CPU_DEVICES):
        count *= 2
    return count


def configure_cpu_devices(env: dict[str, str] | None = None, cores: int | None = None) -> int | None:
    """Split the host CPU into several XLA devices, so that data-parallel training uses every core.

    XLA:CPU runs most convolutions of the train step on one thread. With one CPU device per core
    and the batch sharded over them (see ``make_mesh``), each core runs its share of the batch.
    This appends ``--xla_force_host_platform_device_count`` to ``XLA_FLAGS`` in ``env`` (default:
    ``os.environ``) and returns the count. It changes nothing, and returns None, when
    ``XLA_FLAGS`` already sets the count or when JAX has already started its backends, because
    XLA reads the flag only then. Set ``DDPM_CPU_DEVICES=1`` to keep one CPU device. Other
    platforms (GPU, TPU) are not affected.
    """
    env = os.environ if env is None else env
    flags = env.get("XLA_FLAGS", "")
    if HOST_DEVICE_FLAG in flags:
        return None
    count = cpu_device_count(env, cores)
    if count == 1:
        return None
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        logger.debug("JAX backends already started; keeping the current CPU device count")
        return None
    env["XLA_FLAGS"] = f"{flags} {HOST_DEVICE_FLAG}={count}".strip()
    return count


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    env: Mapping[str, str] | None = None,
) -> bool:
    """Start ``jax.distributed`` when a multi-process run is configured; return whether it runs.

    Arguments take precedence over the environment variables ``JAX_COORDINATOR_ADDRESS``
    (``host:port`` of process 0), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. Nothing happens
    when none of the three is set, so single-process runs need no configuration. This must run
    before the first JAX computation of the process.

    Raises:
      ValueError: only some of the three values are set, or a count or id is not a valid integer.
      RuntimeError: JAX has already started its backend in this process.
    """
    env = os.environ if env is None else env
    coordinator_address = coordinator_address or env.get(COORDINATOR_ADDRESS_ENV) or None
    if num_processes is None:
        num_processes = _read_int(env, NUM_PROCESSES_ENV)
    if process_id is None:
        process_id = _read_int(env, PROCESS_ID_ENV)

    values = {COORDINATOR_ADDRESS_ENV: coordinator_address, NUM_PROCESSES_ENV: num_processes,
              PROCESS_ID_ENV: process_id}
    if all(value is None for value in values.values()):
        return False
    missing = [name for name, value in values.items() if value is None]
    if missing:
        raise ValueError(f"multi-process training needs {', '.join(values)}; missing: {', '.join(missing)}")
    if num_processes < 1:
        raise ValueError(f"{NUM_PROCESSES_ENV} must be at least 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"{PROCESS_ID_ENV} must be in [0, {num_processes - 1}], got {process_id}")

    if jax.distributed.is_initialized():
        return True
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    except RuntimeError as error:
        raise RuntimeError(
            f"failed to start jax.distributed as process {process_id} of {num_processes}: {error} "
            "Start it before any JAX computation, for example at the top of the launch script."
        ) from error
    logger.info("Started jax.distributed: process %d of %d, coordinator %s, %d local and %d global devices",
                process_id, num_processes, coordinator_address, jax.local_device_count(), jax.device_count())
    return True


def _read_int(env: Mapping[str, str], name: str) -> int | None:
    text = env.get(name)
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {text!r}") from None


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """Build a one-dimensional mesh with axis ``"data"`` over ``devices`` (default: every device of the run)."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("devices is empty; a mesh needs at least one device")
    return Mesh(np.array(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Return the sharding that keeps a full copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Return the sharding that splits the leading (batch) axis over ``"data"``."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh | AbstractMesh) -> None:
    """Raise ValueError unless the global batch splits evenly over the devices of ``mesh``."""
    device_count = mesh.size
    if batch_size % device_count:
        raise ValueError(
            f"train.batch_size={batch_size} must be divisible by the number of devices ({device_count}); "
            f"use a multiple of {device_count}, such as {max(device_count, batch_size // device_count * device_count)}"
        )


def constrain_batch(tree: Any, mesh: Mesh | None) -> Any:
    """Inside a jitted function, ask XLA to shard every array of ``tree`` over ``"data"``.

    Without a mesh, ``tree`` is returned unchanged.
    """
    if mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, batch_sharded(mesh))


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Copy every array of ``tree`` to every device of ``mesh``.

    The values are gathered to the host and rebuilt with ``jax.make_array_from_callback``, which
    also works when the mesh spans several processes. Each process must then pass the same values.
    """
    sharding = replicated(mesh)

    def put(leaf):
        if not isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
            return leaf
        if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
            return leaf
        host = np.asarray(jax.device_get(leaf))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: np.asarray(host[index]))

    return jax.tree.map(put, tree)


def shard_state(state: Any, mesh: Mesh) -> Any:
    """Replicate a training state (parameters, EMA weights, optimiser state, step, key) on ``mesh``."""
    return put_replicated(state, mesh)

"""Tests for data-parallel training (ddpm_core.parallel and its use in ddpm_core.train).

XLA fixes the number of CPU devices when JAX starts, so the runs on several devices happen in
subprocesses started with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``. This file is
also the worker those subprocesses run: ``python tests/test_parallel.py worker`` trains the smoke
model for a few steps on every device it finds and prints one JSON line with what the tests check.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

STEPS = 4
# Neither the global nor the per-device batch equals a channel count of the smoke model, so
# their shapes are unambiguous in the compiled HLO.
BATCH_SIZE = 12
# Class-conditional with dropout, so the label and dropout draws are sharded too.
OVERRIDES = {
    "train.steps": STEPS,
    "train.batch_size": BATCH_SIZE,
    "train.steps_per_dispatch": 1,
    "train.log_every": 1,
    "train.checkpoint_every": STEPS,
    "train.warmup_steps": 0,
    "train.label_dropout": 0.5,
    "model.num_classes": 10,
    "model.dropout": 0.1,
}
WORKER_TIMEOUT_S = 240
HOST_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def bar_images() -> tuple[np.ndarray, np.ndarray]:
    """16 fixed uint8 images [16, 28, 28, 1], each a white bar at its own height, and their labels."""
    images = np.zeros((16, 28, 28, 1), np.uint8)
    for index in range(16):
        images[index, 4 + index:10 + index, 6:22, 0] = 255
    return images, np.arange(16, dtype=np.int32) % 10


def run_worker(cache_dir: str) -> dict:
    """Train the smoke model on every visible device; return losses and what the sharding looked like."""
    import jax

    from ddpm_core.config import make_config
    from ddpm_core.parallel import put_replicated
    from ddpm_core.train import compile_train_chunk, create_trainer, run_training

    # The compilation cache lets run_training reuse the compilation below instead of repeating
    # it. JAX reads these settings at its first compilation, so they come first.
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    config = make_config("smoke", OVERRIDES)
    trainer, state = create_trainer(config)
    images, labels = bar_images()

    # After SPMD partitioning, the compiled step shows the shapes one device works on. The
    # arguments are placed as run_training places them, so that both compilations are the same.
    compiled = compile_train_chunk(trainer).lower(
        state, put_replicated(images, trainer.mesh), put_replicated(labels, trainer.mesh)
    ).compile()
    hlo = compiled.as_text()
    per_device = BATCH_SIZE // jax.device_count()

    records = []
    final = run_training(trainer, state, images, labels, on_log=records.append)

    try:
        create_trainer(make_config("smoke", {**OVERRIDES, "train.batch_size": 7}))
        indivisible_error = ""
    except ValueError as error:
        indivisible_error = str(error)

    first_param = jax.tree.leaves(final.params)[0]
    return {
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "mesh_size": int(trainer.mesh.devices.size),
        "mesh_axes": list(trainer.mesh.axis_names),
        "param_devices": len(first_param.sharding.device_set),
        "param_replicated": bool(first_param.sharding.is_fully_replicated),
        "per_device_batch_in_hlo": f"f32[{per_device},28,28," in hlo,
        "full_batch_in_hlo": f"f32[{BATCH_SIZE},28,28," in hlo,
        "steps": [record.step for record in records],
        "losses": [record.loss for record in records],
        "grad_norms": [record.grad_norm for record in records],
        "indivisible_error": indivisible_error,
    }


def start_worker(device_count: int, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    # Drop the device count that the test session itself runs with.
    flags = [flag for flag in env.get("XLA_FLAGS", "").split() if not flag.startswith(HOST_DEVICE_FLAG)]
    env["XLA_FLAGS"] = " ".join(flags + [f"{HOST_DEVICE_FLAG}={device_count}"])
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra_env or {})
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "worker"], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_worker(process: subprocess.Popen) -> dict:
    try:
        stdout, stderr = process.communicate(timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"worker timed out after {WORKER_TIMEOUT_S} s; stderr:\n{stderr[-3000:]}")
    assert process.returncode == 0, f"worker failed with exit status {process.returncode}:\n{stderr[-3000:]}"
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs() -> dict[int, dict]:
    """Results of the worker on one and on two CPU devices, started side by side."""
    processes = {count: start_worker(count) for count in (1, 2)}
    return {count: finish_worker(process) for count, process in processes.items()}


def test_one_device_mesh(runs):
    run = runs[1]

    assert run["device_count"] == 1
    assert run["mesh_size"] == 1
    assert run["mesh_axes"] == ["data"]
    assert run["per_device_batch_in_hlo"]


def test_two_devices_mesh(runs):
    run = runs[2]

    assert run["device_count"] == 2
    assert run["mesh_size"] == 2
    assert run["mesh_axes"] == ["data"]


def test_two_devices_replicate_params(runs):
    run = runs[2]

    assert run["param_devices"] == 2
    assert run["param_replicated"]


def test_two_devices_shard_batch(runs):
    # Each device runs the network on 6 of the 12 images, never on the whole batch.
    run = runs[2]

    assert run["per_device_batch_in_hlo"]
    assert not run["full_batch_in_hlo"]


def test_two_devices_match_one_device(runs):
    one, two = runs[1], runs[2]

    assert one["steps"] == list(range(1, STEPS + 1))
    assert two["steps"] == one["steps"]
    assert all(np.isfinite(one["losses"]))
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-4)
    np.testing.assert_allclose(two["grad_norms"], one["grad_norms"], rtol=1e-4)


def test_indivisible_batch_raises(runs):
    message = runs[2]["indivisible_error"]

    assert "train.batch_size=7" in message
    assert "divisible by the number of devices (2)" in message


def test_one_device_accepts_any_batch(runs):
    assert runs[1]["indivisible_error"] == ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_match_one_device(runs):
    # Two processes with one CPU device each, joined through jax.distributed and gloo
    # collectives. The coordinator binds to 127.0.0.1 only; jax's default is every interface.
    address = f"127.0.0.1:{free_port()}"
    env = {"JAX_COORDINATOR_ADDRESS": address, "JAX_COORDINATOR_BIND_ADDRESS": address, "JAX_NUM_PROCESSES": "2"}
    processes = [start_worker(1, {**env, "JAX_PROCESS_ID": str(rank)}) for rank in range(2)]
    results = [finish_worker(process) for process in processes]

    for result in results:
        assert result["process_count"] == 2
        assert result["device_count"] == 2
        assert result["mesh_size"] == 2
        assert result["per_device_batch_in_hlo"]
        np.testing.assert_allclose(result["losses"], runs[1]["losses"], rtol=1e-4)
    assert results[0]["losses"] == results[1]["losses"]


def test_distributed_not_configured():
    from ddpm_core.parallel import maybe_initialize_distributed

    assert maybe_initialize_distributed(env={}) is False
    assert maybe_initialize_distributed(env={"JAX_NUM_PROCESSES": ""}) is False


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"JAX_NUM_PROCESSES": "2"}, "missing: JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID"),
        ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
         "JAX_NUM_PROCESSES must be an integer, got 'two'"),
        ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
         r"JAX_PROCESS_ID must be in \[0, 1\], got 2"),
        ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "0", "JAX_PROCESS_ID": "0"},
         "JAX_NUM_PROCESSES must be at least 1, got 0"),
    ],
)
def test_distributed_rejects_bad_settings(env, message):
    from ddpm_core.parallel import maybe_initialize_distributed

    with pytest.raises(ValueError, match=message):
        maybe_initialize_distributed(env=env)


@pytest.mark.parametrize(("batch_size", "device_count"), [(7, 2), (8, 3), (2, 4)])
def test_check_batch_size_rejects(batch_size, device_count):
    from jax.sharding import AbstractMesh

    from ddpm_core.parallel import check_batch_size

    mesh = AbstractMesh((device_count,), ("data",))
    with pytest.raises(ValueError, match=f"train.batch_size={batch_size} must be divisible by the number "
                                         rf"of devices \({device_count}\)"):
        check_batch_size(batch_size, mesh)


@pytest.mark.parametrize(("batch_size", "device_count"), [(7, 1), (8, 2), (64, 8)])
def test_check_batch_size_accepts(batch_size, device_count):
    from jax.sharding import AbstractMesh

    from ddpm_core.parallel import check_batch_size

    check_batch_size(batch_size, AbstractMesh((device_count,), ("data",)))


if __name__ == "__main__" and sys.argv[1:] == ["worker"]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ddpm-test-parallel-") as worker_cache_dir:
        result = run_worker(worker_cache_dir)
    print(json.dumps(result))


@pytest.mark.parametrize(("cores", "expected"), [(1, 1), (2, 2), (3, 2), (6, 4), (8, 8), (64, 8)])
def test_cpu_device_count_follows_cores(cores, expected):
    from ddpm_core.parallel import cpu_device_count

    assert cpu_device_count(env={}, cores=cores) == expected


def test_cpu_device_count_setting_wins():
    from ddpm_core.parallel import cpu_device_count

    assert cpu_device_count(env={"DDPM_CPU_DEVICES": "3"}, cores=2) == 3
    assert cpu_device_count(env={"DDPM_CPU_DEVICES": "1"}, cores=16) == 1
    with pytest.raises(ValueError, match="DDPM_CPU_DEVICES must be at least 1"):
        cpu_device_count(env={"DDPM_CPU_DEVICES": "0"}, cores=2)
    with pytest.raises(ValueError, match="DDPM_CPU_DEVICES must be an integer"):
        cpu_device_count(env={"DDPM_CPU_DEVICES": "two"}, cores=2)


def test_configure_cpu_devices_sets_flag_once():
    from ddpm_core.parallel import configure_cpu_devices

    env = {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}
    # JAX started its backends when this session began, so only the environment logic is checked
    # here; a subprocess checks the effect below.
    import jax._src.xla_bridge as bridge

    started = bridge.backends_are_initialized
    bridge.backends_are_initialized = lambda: False
    try:
        assert configure_cpu_devices(env, cores=4) == 4
        assert env["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=4"
        assert configure_cpu_devices(env, cores=4) is None  # already set: unchanged
        assert env["XLA_FLAGS"].count("device_count") == 1
        one = {"DDPM_CPU_DEVICES": "1"}
        assert configure_cpu_devices(one, cores=4) is None
        assert "XLA_FLAGS" not in one
    finally:
        bridge.backends_are_initialized = started


def test_configure_cpu_devices_gives_jax_that_many_devices():
    code = ("from ddpm_core.parallel import configure_cpu_devices; n = configure_cpu_devices(); "
            "import jax; print(n, jax.device_count())")
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    env["DDPM_CPU_DEVICES"] = "3"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=WORKER_TIMEOUT_S, check=True)
    assert result.stdout.split() == ["3", "3"]


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm_solver_pp"])
def test_sampling_split_over_devices_gives_same_images(sampler):
    import jax

    from ddpm_core.config import make_config
    from ddpm_core.parallel import make_mesh, put_replicated
    from ddpm_core.sampling import ddim_sample, ddpm_sample, dpm_solver_pp_sample
    from ddpm_core.schedule import make_coefficients
    from ddpm_core.unet import ModelApply, create_model

    if jax.local_device_count() < 2:
        pytest.skip("needs several devices: the test session splits the CPU only on machines with 2 cores or more")
    from flax import nnx

    config = make_config("smoke", {"model.num_classes": 10})
    graphdef, params = nnx.split(create_model(config.model, seed=3))
    apply_fn = ModelApply(graphdef)
    coeffs = make_coefficients(config.diffusion.schedule, config.diffusion.num_timesteps)
    mesh = make_mesh(jax.local_devices())
    shape = (2 * mesh.size, 28, 28, 1)
    labels = jax.numpy.arange(shape[0]) % 10
    run = {"ddpm": lambda **kw: ddpm_sample(apply_fn, kw.pop("params"), coeffs, jax.random.PRNGKey(0), shape, **kw),
           "ddim": lambda **kw: ddim_sample(apply_fn, kw.pop("params"), coeffs, jax.random.PRNGKey(0), shape,
                                            num_steps=5, eta=1.0, **kw),
           "dpm_solver_pp": lambda **kw: dpm_solver_pp_sample(apply_fn, kw.pop("params"), coeffs,
                                                              jax.random.PRNGKey(0), shape, num_steps=5, **kw)}[sampler]
    single, _ = run(params=params, labels=labels, guidance_scale=1.5, null_label=10)
    split, _ = run(params=put_replicated(params, mesh), labels=labels, guidance_scale=1.5, null_label=10, mesh=mesh)
    assert len(split.sharding.device_set) == mesh.size
    np.testing.assert_allclose(np.asarray(split), np.asarray(single), atol=2e-5)

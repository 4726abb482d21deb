"""Tests for ddpm_core.train and ddpm_core.checkpoint on the smoke model.

Compiling a training step takes about ten seconds on a 2-core CPU, so the tests share one compiled
step. The module fixture ``straight_run`` trains 24 steps and records what the tests compare against.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddpm_core.checkpoint import (
    export_model,
    latest_step,
    load_model,
    read_checkpoint_config,
    restore_checkpoint,
    save_checkpoint,
)
from ddpm_core.config import make_config
from ddpm_core.train import (
    LogRecord,
    compile_train_chunk,
    create_trainer,
    ema_decay_at,
    make_lr_schedule,
    make_optimizer,
    run_training,
)
from ddpm_core.unet import ModelApply

STEPS = 24
RESUME_STEP = 12
LEARNING_RATE = 2e-3
OVERRIDES = {
    "train.steps": STEPS,
    "train.steps_per_dispatch": 1,
    "train.learning_rate": LEARNING_RATE,
    "train.log_every": 4,
    "train.checkpoint_every": RESUME_STEP,
}


def smoke_config(**train_overrides):
    overrides = dict(OVERRIDES)
    overrides.update({f"train.{key}": value for key, value in train_overrides.items()})
    return make_config("smoke", overrides)


def bar_images():
    """16 fixed uint8 images [16, 28, 28, 1], each a white bar at its own height."""
    images = np.zeros((16, 28, 28, 1), np.uint8)
    for index in range(16):
        images[index, 4 + index:10 + index, 6:22, 0] = 255
    return images


LABELS = np.zeros(16, np.int32)


def to_host(state):
    """Copy a state to NumPy, so the donated device buffers can be reused."""
    return jax.device_get(state)


def assert_trees_equal(actual, expected):
    """Same tree structure and bit-identical leaves."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    actual_leaves = jax.tree.leaves_with_path(actual)
    expected_leaves = jax.tree.leaves(expected)
    for (path, actual_leaf), expected_leaf in zip(actual_leaves, expected_leaves):
        name = jax.tree_util.keystr(path)
        actual_leaf = np.asarray(actual_leaf)
        expected_leaf = np.asarray(expected_leaf)
        assert actual_leaf.dtype == expected_leaf.dtype, name
        np.testing.assert_array_equal(actual_leaf, expected_leaf, err_msg=name)


def assert_states_equal(actual, expected):
    assert int(actual.step) == int(expected.step)
    np.testing.assert_array_equal(np.asarray(actual.key), np.asarray(expected.key))
    assert_trees_equal(actual.params, expected.params)
    assert_trees_equal(actual.ema_params, expected.ema_params)
    assert_trees_equal(actual.opt_state, expected.opt_state)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """Train STEPS steps without stopping, saving a checkpoint at RESUME_STEP on the way.

    Returns host copies of the states at steps 0, 1, 2, 6, RESUME_STEP and STEPS, the per-step
    losses, the compiled step, the model's apply function and the checkpoint folder.
    """
    config = smoke_config()
    trainer, state = create_trainer(config)
    train_chunk = compile_train_chunk(trainer)
    images = jnp.asarray(bar_images())
    labels = jnp.asarray(LABELS)
    checkpoint_dir = str(tmp_path_factory.mktemp("straight") / "checkpoints")

    states = {0: to_host(state)}
    losses = []
    for step in range(1, STEPS + 1):
        state, metrics = train_chunk(state, images, labels)
        losses.extend(np.asarray(metrics["loss"]).tolist())
        if step in (1, 2, 6, RESUME_STEP, STEPS):
            states[step] = to_host(state)
        if step == RESUME_STEP:
            save_checkpoint(checkpoint_dir, state, config)
    return {"config": config, "states": states, "losses": losses, "train_chunk": train_chunk,
            "checkpoint_dir": checkpoint_dir, "apply": trainer.apply}


@pytest.fixture(scope="module")
def resumed_run(straight_run):
    """Restore the RESUME_STEP checkpoint in a fresh trainer and finish with run_training."""
    config = straight_run["config"]
    trainer, state = restore_checkpoint(straight_run["checkpoint_dir"], config)
    restored = to_host(state)
    logs = []
    checkpoints = []
    final = run_training(trainer, state, bar_images(), LABELS, on_log=logs.append,
                         on_checkpoint=lambda saved: checkpoints.append(int(saved.step)))
    return {"restored": restored, "final": to_host(final), "logs": logs, "checkpoints": checkpoints}


def test_loss_falls_on_fixed_batch(straight_run):
    losses = straight_run["losses"]
    first = float(np.mean(losses[:5]))
    last = float(np.mean(losses[-5:]))

    assert len(losses) == STEPS
    assert all(np.isfinite(losses))
    # A fresh model predicts zero noise, so the first losses are close to E[eps^2] = 1.
    assert 0.85 < first < 1.1
    assert last < 0.7 * first


def test_step_counter_advances(straight_run):
    states = straight_run["states"]

    for step, state in states.items():
        assert int(state.step) == step
        assert state.step.dtype == np.int32


def test_first_step_has_zero_learning_rate(straight_run):
    # Warm-up starts at a learning rate of 0, so the first update leaves the weights unchanged.
    states = straight_run["states"]

    assert_trees_equal(states[1].params, states[0].params)


def test_params_change_after_warmup_starts(straight_run):
    states = straight_run["states"]
    before = jax.tree.leaves(states[1].params)
    after = jax.tree.leaves(states[2].params)

    assert any(not np.array_equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("step", [0, 1])
def test_ema_update_one_step(straight_run, step):
    states = straight_run["states"]
    config = straight_run["config"].train
    old = states[step]
    new = states[step + 1]
    decay = float(ema_decay_at(config, jnp.asarray(step, jnp.int32)))

    assert decay == pytest.approx((1 + step) / (10 + step), rel=1e-7)
    for ema_old, params_new, ema_new in zip(jax.tree.leaves(old.ema_params), jax.tree.leaves(new.params),
                                            jax.tree.leaves(new.ema_params)):
        expected = decay * ema_old.astype(np.float64) + (1.0 - decay) * params_new.astype(np.float64)
        np.testing.assert_allclose(ema_new, expected, rtol=1e-6, atol=1e-7)


def test_ema_trails_params(straight_run):
    state = straight_run["states"][2]
    ema = jax.tree.leaves(state.ema_params)
    params = jax.tree.leaves(state.params)

    assert any(not np.array_equal(e, p) for e, p in zip(ema, params))


def test_ema_decay_warmup_values():
    config = smoke_config().train

    assert float(ema_decay_at(config, jnp.asarray(0))) == pytest.approx(0.1, rel=1e-7)
    assert float(ema_decay_at(config, jnp.asarray(8))) == pytest.approx(0.5, rel=1e-7)
    assert float(ema_decay_at(config, jnp.asarray(1_000_000))) == pytest.approx(0.999, rel=1e-7)


def test_ema_decay_without_warmup():
    config = smoke_config(ema_warmup=False, ema_decay=0.99).train

    assert float(ema_decay_at(config, jnp.asarray(0))) == pytest.approx(0.99, rel=1e-7)
    assert float(ema_decay_at(config, jnp.asarray(500))) == pytest.approx(0.99, rel=1e-7)


def test_same_seed_bit_identical(straight_run):
    config = straight_run["config"]
    _, state = create_trainer(config)
    assert_states_equal(to_host(state), straight_run["states"][0])

    images = jnp.asarray(bar_images())
    labels = jnp.asarray(LABELS)
    for _ in range(6):
        state, _ = straight_run["train_chunk"](state, images, labels)

    assert_states_equal(to_host(state), straight_run["states"][6])


def test_different_seed_differs(straight_run):
    _, state = create_trainer(smoke_config(seed=1))
    reference = straight_run["states"][0]

    assert not np.array_equal(np.asarray(state.key), np.asarray(reference.key))
    leaves = jax.tree.leaves(state.params)
    reference_leaves = jax.tree.leaves(reference.params)
    assert any(not np.array_equal(a, b) for a, b in zip(leaves, reference_leaves))


def test_restored_checkpoint_matches_saved(straight_run, resumed_run):
    assert_states_equal(resumed_run["restored"], straight_run["states"][RESUME_STEP])


def test_resumed_equals_uninterrupted(straight_run, resumed_run):
    assert_states_equal(resumed_run["final"], straight_run["states"][STEPS])


def test_resumed_run_logs_and_checkpoints(straight_run, resumed_run):
    logs = resumed_run["logs"]
    losses = straight_run["losses"]
    schedule = make_lr_schedule(straight_run["config"].train)

    assert [record.step for record in logs] == [16, 20, 24]
    assert all(isinstance(record, LogRecord) for record in logs)
    # Each record averages the losses of its 4 steps, which match the uninterrupted run.
    for record in logs:
        np.testing.assert_allclose(record.loss, np.mean(losses[record.step - 4:record.step]), rtol=1e-6)
        np.testing.assert_allclose(record.learning_rate, float(schedule(record.step - 1)), rtol=1e-6)
    assert resumed_run["checkpoints"] == [STEPS]


def test_resume_rejects_misaligned_step():
    # The smoke preset runs 2 steps per dispatch, so a state at step 1 cannot resume.
    trainer, state = create_trainer(make_config("smoke"))
    state = state.replace(step=jnp.asarray(1, jnp.int32))

    with pytest.raises(ValueError, match="cannot resume at step 1"):
        run_training(trainer, state, bar_images(), LABELS)


def test_checkpoint_round_trip_bit_exact(straight_run, tmp_path):
    config = straight_run["config"]
    saved = straight_run["states"][STEPS]
    directory = str(tmp_path / "checkpoints")

    assert save_checkpoint(directory, saved, config) == STEPS
    assert latest_step(directory) == STEPS
    assert read_checkpoint_config(directory) == config
    # Train settings may change between runs, but model and diffusion settings may not.
    longer = smoke_config(steps=48, learning_rate=1e-3)
    trainer, restored = restore_checkpoint(directory, longer)

    assert trainer.config == longer
    assert restored.step.dtype == jnp.int32
    assert restored.key.dtype == jnp.uint32
    assert_states_equal(to_host(restored), saved)


def test_restore_rejects_other_model(straight_run):
    directory = straight_run["checkpoint_dir"]
    other_model = make_config("smoke", {**OVERRIDES, "model.base_channels": 16})

    with pytest.raises(ValueError, match="another model or diffusion configuration"):
        restore_checkpoint(directory, other_model)


def test_restore_rejects_other_diffusion(straight_run):
    directory = straight_run["checkpoint_dir"]
    other_diffusion = make_config("smoke", {**OVERRIDES, "diffusion.schedule": "cosine"})

    with pytest.raises(ValueError, match="another model or diffusion configuration"):
        restore_checkpoint(directory, other_diffusion)


def test_restore_without_checkpoint_raises(tmp_path):
    assert latest_step(str(tmp_path / "missing")) is None
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        restore_checkpoint(str(tmp_path / "missing"), smoke_config())


def test_export_load_round_trip(straight_run, tmp_path):
    config = straight_run["config"]
    ema_params = straight_run["states"][STEPS].ema_params
    directory = export_model(str(tmp_path / "model"), ema_params, config)

    apply, params, loaded_config = load_model(directory)

    assert isinstance(apply, ModelApply)
    assert loaded_config == config
    assert_trees_equal(params, ema_params)


def test_loaded_model_has_same_graph(straight_run, tmp_path):
    config = straight_run["config"]
    ema_params = straight_run["states"][STEPS].ema_params
    apply, _, _ = load_model(export_model(str(tmp_path / "model"), ema_params, config))

    # Equal graphs applied to bit-identical parameters give identical predictions.
    assert apply == straight_run["apply"]
    assert hash(apply) == hash(straight_run["apply"])


def test_load_model_missing_config_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path))


def test_lr_warmup_starts_at_zero():
    config = smoke_config(steps=100, warmup_steps=10, lr_schedule="cosine").train
    schedule = make_lr_schedule(config)

    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(LEARNING_RATE / 2, rel=1e-6)
    assert float(schedule(10)) == pytest.approx(LEARNING_RATE, rel=1e-6)


def test_lr_cosine_decays_to_tenth():
    config = smoke_config(steps=100, warmup_steps=10, lr_schedule="cosine").train
    schedule = make_lr_schedule(config)
    # Half-way through the decay the cosine factor is 0.5, so the rate is 0.1 + 0.9 * 0.5 = 0.55 of the peak.
    assert float(schedule(55)) == pytest.approx(0.55 * LEARNING_RATE, rel=1e-5)
    assert float(schedule(100)) == pytest.approx(0.1 * LEARNING_RATE, rel=1e-5)


def test_lr_constant_after_warmup():
    config = smoke_config(steps=100, warmup_steps=4, lr_schedule="constant").train
    schedule = make_lr_schedule(config)

    assert float(schedule(2)) == pytest.approx(LEARNING_RATE / 2, rel=1e-6)
    assert float(schedule(4)) == pytest.approx(LEARNING_RATE, rel=1e-6)
    assert float(schedule(99)) == pytest.approx(LEARNING_RATE, rel=1e-6)


def test_lr_without_warmup_starts_at_peak():
    config = smoke_config(warmup_steps=0, lr_schedule="constant").train

    assert float(make_lr_schedule(config)(0)) == pytest.approx(LEARNING_RATE, rel=1e-6)


def test_optimizer_clips_gradient_norm():
    config = smoke_config(warmup_steps=0, lr_schedule="constant", grad_clip_norm=1.0).train
    optimizer = make_optimizer(config)
    params = {"w": jnp.zeros(4)}
    # Adam normalises the update, so compare the clipped gradient stored in the first moment.
    state = optimizer.init(params)
    _, state = optimizer.update({"w": jnp.full(4, 10.0)}, state, params)
    first_moment = optax.tree.get(state, "mu")["w"]

    np.testing.assert_allclose(np.asarray(first_moment), (1 - 0.9) * 0.5 * np.ones(4), rtol=1e-6)

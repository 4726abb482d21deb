"""End-to-end: the real train_pipeline flow with the smoke preset, real TFDS data and a real MLflow store."""

from __future__ import annotations

import json
import os

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from flows.cli import main as cli_main
from flows.sample_pipeline import sample_pipeline
from flows.train_pipeline import train_pipeline
from tasks.promote_model import decide, promote_model
from tasks.register_model import MLFLOW_RUN_TAG, PREFECT_FLOW_RUN_TAG, register_model
from tasks.settings import load_mlflow_settings, read_manifest


@pytest.fixture(scope="module")
def smoke_run(prefect_server, mnist_dir, tmp_path_factory):
    """Run train_pipeline once with the smoke preset; shared by the tests of this module."""
    root = tmp_path_factory.mktemp("pipeline")
    settings_path = root / "mlflow.yaml"
    settings_path.write_text(
        f"tracking_uri: sqlite:///{root / 'mlflow.db'}\n"
        f"artifact_location: {root / 'mlartifacts'}\n"
        "experiment_name: test-ddpm\n"
        "registered_model_name: test-ddpm\n",
        encoding="utf-8",
    )
    result = train_pipeline(preset="smoke", mnist_dir=mnist_dir, data_dir=str(root / "data"),
                            output_dir=str(root / "outputs"), run_name="smoke-test",
                            mlflow_config=str(settings_path))
    settings = load_mlflow_settings(str(settings_path))
    return {"result": result, "settings": settings, "settings_path": str(settings_path), "root": root}


def test_pipeline_registers_one_version(smoke_run):
    settings = smoke_run["settings"]
    client = MlflowClient(settings.resolved_tracking_uri())
    versions = client.search_model_versions(f"name = '{settings.registered_model_name}'")
    assert len(versions) == 1
    assert str(versions[0].version) == smoke_run["result"]["model_version"]
    assert versions[0].run_id == smoke_run["result"]["mlflow_run_id"]


def test_version_tagged_with_run_ids(smoke_run):
    settings = smoke_run["settings"]
    client = MlflowClient(settings.resolved_tracking_uri())
    version = client.get_model_version(settings.registered_model_name, smoke_run["result"]["model_version"])
    assert version.tags[MLFLOW_RUN_TAG] == smoke_run["result"]["mlflow_run_id"]
    assert version.tags[PREFECT_FLOW_RUN_TAG]
    challenger = client.get_model_version_by_alias(settings.registered_model_name, "challenger")
    assert str(challenger.version) == str(version.version)
    # The first version becomes champion even without an evaluation.
    champion = client.get_model_version_by_alias(settings.registered_model_name, "champion")
    assert str(champion.version) == str(version.version)
    assert smoke_run["result"]["model_alias"] == "champion"


def test_run_has_params_metrics_artifacts(smoke_run):
    settings = smoke_run["settings"]
    client = MlflowClient(settings.resolved_tracking_uri())
    run_id = smoke_run["result"]["mlflow_run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "8"
    assert run.data.params["model.channel_mults"] == "1,2"
    assert run.data.tags[PREFECT_FLOW_RUN_TAG] == client.get_model_version(
        settings.registered_model_name, smoke_run["result"]["model_version"]).tags[PREFECT_FLOW_RUN_TAG]
    history = client.get_metric_history(run_id, "loss")
    assert [metric.step for metric in history] == [4, 8]
    assert all(np.isfinite(metric.value) for metric in history)
    artifacts = {item.path for item in client.list_artifacts(run_id, "samples")}
    assert artifacts == {"samples/denoising.gif", "samples/samples.png"}


def test_gif_has_all_frames(smoke_run):
    gif = Image.open(smoke_run["result"]["gif_path"])
    # smoke preset: T = 20, a frame every 5 steps, plus the initial noise.
    assert gif.n_frames == 5
    assert gif.mode in ("L", "P")


def test_pyfunc_model_generates_images(smoke_run):
    settings = smoke_run["settings"]
    mlflow.set_tracking_uri(settings.resolved_tracking_uri())
    model = mlflow.pyfunc.load_model(f"models:/{settings.registered_model_name}@champion")
    import pandas as pd

    images = model.predict(pd.DataFrame({"num_samples": [3], "seed": [1]}))
    assert images.shape == (3, 28, 28, 1)
    assert images.dtype == np.float32
    assert images.min() >= -1.0
    assert images.max() <= 1.0
    again = model.predict(pd.DataFrame({"num_samples": [3], "seed": [1]}))
    np.testing.assert_array_equal(images, again)


def test_model_states_its_requirements(smoke_run):
    import importlib.metadata

    settings = smoke_run["settings"]
    mlflow.set_tracking_uri(settings.resolved_tracking_uri())
    local = mlflow.artifacts.download_artifacts(f"models:/{settings.registered_model_name}@champion")
    with open(f"{local}/requirements.txt", encoding="utf-8") as handle:
        requirements = handle.read().split()
    assert f"jax=={importlib.metadata.version('jax')}" in requirements
    assert f"flax=={importlib.metadata.version('flax')}" in requirements
    assert any(line.startswith("mlflow==") for line in requirements)


def test_register_again_adds_no_version(smoke_run):
    settings = smoke_run["settings"]
    result = smoke_run["result"]
    manifest = read_manifest(result["run_dir"])
    version = register_model.fn(manifest["model_dir"], result["mlflow_run_id"], settings.registered_model_name,
                                settings.resolved_tracking_uri())
    assert version == result["model_version"]
    client = MlflowClient(settings.resolved_tracking_uri())
    assert len(client.search_model_versions(f"name = '{settings.registered_model_name}'")) == 1


def test_sample_pipeline_from_alias(smoke_run):
    result = sample_pipeline(model="@champion", num_samples=2, seed=3, sampler="ddim", steps=4, frame_every=2,
                             grid_cols=2, upscale=1, output_dir=str(smoke_run["root"] / "samples"),
                             mlflow_config=smoke_run["settings_path"])
    with np.load(result["samples_path"]) as samples:
        assert samples["images"].shape == (2, 28, 28, 1)
        # DDIM with 4 steps and a frame every 2: initial noise plus 2 frames.
        assert samples["frames"].shape == (3, 2, 28, 28, 1)
    assert os.path.isfile(result["gif_path"])


def test_cli_task_renders_from_manifest(smoke_run, capsys):
    run_dir = smoke_run["result"]["run_dir"]
    os.remove(smoke_run["result"]["png_path"])
    status = cli_main(["task", "render-gif", "--run-dir", run_dir])
    assert status == 0
    paths = json.loads(capsys.readouterr().out)
    assert paths[1] == smoke_run["result"]["png_path"]
    assert os.path.isfile(paths[1])


def test_cli_rejects_bad_value_early(capsys):
    status = cli_main(["train", "--preset", "smoke", "--set", "train.batch_size=0"])
    assert status == 2
    error = capsys.readouterr().err
    assert "train.batch_size" in error
    assert "greater than or equal to 1" in error


def test_cli_rejects_bad_digits_early(capsys):
    status = cli_main(["sample", "--digits", "2", "12"])
    assert status == 2
    assert "--digits must be in [0, 9], got [12]" in capsys.readouterr().err


def test_cli_rejects_bad_cpu_device_count(monkeypatch, capsys):
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("DDPM_CPU_DEVICES", "abc")
    status = cli_main(["presets"])
    assert status == 2
    assert "DDPM_CPU_DEVICES must be an integer, got 'abc'" in capsys.readouterr().err


def test_cli_reports_missing_model_version(smoke_run, capsys):
    status = cli_main(["sample", f"{smoke_run['settings'].registered_model_name}/99", "--num-samples", "1",
                       "--mlflow-config", smoke_run["settings_path"]])
    assert status == 2
    assert "not found" in capsys.readouterr().err


def test_cli_task_needs_manifest(tmp_path, capsys):
    status = cli_main(["task", "train-model", "--run-dir", str(tmp_path)])
    assert status == 2
    assert "run.json" in capsys.readouterr().err


def _register_from_new_run(smoke_run) -> str:
    """Register the smoke run's exported model again from a new MLflow run; return the version."""
    settings = smoke_run["settings"]
    client = MlflowClient(settings.resolved_tracking_uri())
    experiment = client.get_experiment_by_name(settings.experiment_name)
    run_id = client.create_run(experiment.experiment_id).info.run_id
    manifest = read_manifest(smoke_run["result"]["run_dir"])
    return register_model.fn(manifest["model_dir"], run_id, settings.registered_model_name,
                             settings.resolved_tracking_uri())


def test_champion_changes_only_on_better_fd(smoke_run):
    settings = smoke_run["settings"]
    name = settings.registered_model_name
    uri = settings.resolved_tracking_uri()
    client = MlflowClient(uri)
    first = smoke_run["result"]["model_version"]
    measured = {"eval.frechet_distance": 10.0, "eval.num_samples": 100, "eval.seed": 0}
    assert promote_model.fn(name, first, uri, measured) == "champion"

    worse = _register_from_new_run(smoke_run)
    outcome = promote_model.fn(name, worse, uri, {**measured, "eval.frechet_distance": 12.0})
    assert outcome == "challenger"
    assert str(client.get_model_version_by_alias(name, "champion").version) == first
    assert str(client.get_model_version_by_alias(name, "challenger").version) == worse

    other_n = _register_from_new_run(smoke_run)
    outcome = promote_model.fn(name, other_n, uri, {**measured, "eval.frechet_distance": 1.0, "eval.num_samples": 50})
    assert outcome == "challenger"

    better = _register_from_new_run(smoke_run)
    outcome = promote_model.fn(name, better, uri, {**measured, "eval.frechet_distance": 8.5})
    assert outcome == "champion"
    assert str(client.get_model_version_by_alias(name, "champion").version) == better
    tags = client.get_model_version(name, better).tags
    assert tags["eval.frechet_distance"] == "8.5"
    assert tags["promotion.decision"] == "champion"


def test_decide_needs_same_n_and_seed():
    champion = {"eval.frechet_distance": "5.0", "eval.num_samples": "1000", "eval.seed": "0"}
    assert decide({"eval.frechet_distance": 4.0, "eval.num_samples": 1000, "eval.seed": 0}, champion)[0] is True
    assert decide({"eval.frechet_distance": 4.0, "eval.num_samples": 1000, "eval.seed": 1}, champion)[0] is False
    assert decide({"eval.frechet_distance": 6.0, "eval.num_samples": 1000, "eval.seed": 0}, champion)[0] is False
    assert decide(None, champion)[0] is False
    assert decide(None, None)[0] is True

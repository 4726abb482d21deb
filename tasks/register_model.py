"""Task: register the EMA weights as an MLflow pyfunc model version."""

from __future__ import annotations

import importlib.metadata
import json
import os

import mlflow
from mlflow import MlflowClient
from prefect import task

from ddpm_core.config import flatten
from tasks.common import run_logger
from tasks.pyfunc_model import INPUT_EXAMPLE, MODEL_ARTIFACT, SIGNATURE, DdpmSampler

PREFECT_FLOW_RUN_TAG = "prefect_flow_run_id"
MLFLOW_RUN_TAG = "mlflow_run_id"
# Packages that loading the model needs, pinned to the versions installed here. Stating them saves MLflow from
# inferring them by loading the model in a subprocess, which took most of this task's time. The
# inference would also miss jax and friends, because the model imports them lazily.
REQUIRED_PACKAGES = ("mlflow", "jax", "jaxlib", "flax", "orbax-checkpoint", "optax", "pydantic", "numpy", "pandas",
                     "cloudpickle")


def pip_requirements() -> list[str]:
    """Pinned requirements of the registered model, from the installed versions."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in REQUIRED_PACKAGES]


def find_version_of_run(client: MlflowClient, model_name: str, run_id: str) -> str | None:
    """Version number of ``model_name`` already registered from ``run_id``, or None."""
    versions = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    if not versions:
        return None
    return str(min(int(version.version) for version in versions))


@task(name="register_model", retries=2, retry_delay_seconds=5)
def register_model(model_dir: str, mlflow_run_id: str, model_name: str, tracking_uri: str,
                   alias: str = "challenger", flow_run_id: str | None = None) -> str:
    """Log ``model_dir`` as a pyfunc model of the run and register it; return the version number.

    Calling it again for the same run returns the existing version instead of adding one. The
    version is tagged with the MLflow run id and the Prefect flow-run id, and ``alias`` is moved
    to it.
    """
    logger = run_logger()
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no exported model in {model_dir}; run train_model first")
    with open(config_path, encoding="utf-8") as handle:
        config = flatten(json.load(handle))
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)

    version = find_version_of_run(client, model_name, mlflow_run_id)
    if version is not None:
        logger.info("Run %s is already registered as %s version %s", mlflow_run_id, model_name, version)
    else:
        with mlflow.start_run(run_id=mlflow_run_id, nested=mlflow.active_run() is not None):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=DdpmSampler(),
                artifacts={MODEL_ARTIFACT: model_dir},
                input_example=INPUT_EXAMPLE,
                signature=SIGNATURE,
                pip_requirements=pip_requirements(),
                metadata={"ddpm_config": {key: str(value) for key, value in config.items()}},
            )
        registered = mlflow.register_model(info.model_uri, model_name)
        version = str(registered.version)
        logger.info("Registered %s version %s from run %s", model_name, version, mlflow_run_id)

    client.set_model_version_tag(model_name, version, MLFLOW_RUN_TAG, mlflow_run_id)
    if flow_run_id:
        client.set_model_version_tag(model_name, version, PREFECT_FLOW_RUN_TAG, flow_run_id)
    client.set_registered_model_alias(model_name, alias, version)
    return version

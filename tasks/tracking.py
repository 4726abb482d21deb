"""MLflow run bookkeeping for the flows: experiment, run, parameters and final status."""

from __future__ import annotations

from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Param, RunTag

from tasks.settings import MlflowSettings

PREFECT_FLOW_RUN_TAG = "prefect_flow_run_id"
# MLflow limits one log_batch call to 100 parameters.
PARAMS_PER_BATCH = 100


def ensure_experiment(client: MlflowClient, settings: MlflowSettings) -> str:
    """Id of the configured experiment, created with the configured artifact location if missing."""
    experiment = client.get_experiment_by_name(settings.experiment_name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(settings.experiment_name,
                                    artifact_location=settings.resolved_artifact_location())


def start_run(settings: MlflowSettings, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
    """Create an MLflow run with ``params`` and ``tags``; return its id."""
    client = MlflowClient(settings.resolved_tracking_uri())
    experiment_id = ensure_experiment(client, settings)
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    items = [Param(key, str(value)) for key, value in params.items()]
    for start in range(0, len(items), PARAMS_PER_BATCH):
        client.log_batch(run.info.run_id, params=items[start:start + PARAMS_PER_BATCH])
    return run.info.run_id


def tag_run(settings: MlflowSettings, run_id: str, tags: dict[str, str]) -> None:
    """Add ``tags`` to an existing run."""
    client = MlflowClient(settings.resolved_tracking_uri())
    client.log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])


def end_run(settings: MlflowSettings, run_id: str, status: str) -> None:
    """Mark the run FINISHED or FAILED."""
    MlflowClient(settings.resolved_tracking_uri()).set_terminated(run_id, status)

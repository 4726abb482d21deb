"""MLflow settings read from ``mlflow.yaml``, and the per-run manifest shared by the tasks."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

MLFLOW_CONFIG_ENV = "DDPM_MLFLOW_CONFIG"
MANIFEST_FILE = "run.json"


class MlflowSettings(BaseModel):
    """Locations of runs, artifacts and registered models, and the address of the UI."""

    model_config = ConfigDict(extra="forbid")

    tracking_uri: str = Field("sqlite:///mlflow.db", description="tracking store; relative SQLite paths use the working folder")
    artifact_location: str = Field("mlartifacts", description="artifact root of a new experiment (folder or URI)")
    experiment_name: str = Field("ddpm-mnist", min_length=1)
    registered_model_name: str = Field("ddpm-mnist", min_length=1)
    ui_host: str = Field("127.0.0.1", description="address the MLflow UI binds to")
    ui_port: int = Field(5000, ge=1, le=65535)

    def resolved_tracking_uri(self) -> str:
        """Tracking URI with a relative SQLite path made absolute, so every task uses the same file."""
        prefix = "sqlite:///"
        if self.tracking_uri.startswith(prefix):
            path = self.tracking_uri[len(prefix):]
            if not os.path.isabs(path):
                return prefix + os.path.abspath(path)
        return self.tracking_uri

    def resolved_artifact_location(self) -> str:
        """Artifact location as a URI; a plain relative folder becomes an absolute ``file://`` URI."""
        if "://" in self.artifact_location:
            return self.artifact_location
        return Path(self.artifact_location).absolute().as_uri()


def load_mlflow_settings(path: str | None = None) -> MlflowSettings:
    """Read settings from ``path``, else ``$DDPM_MLFLOW_CONFIG``, else ``./mlflow.yaml``, else defaults.

    ``MLFLOW_TRACKING_URI``, when set, overrides the file's tracking URI.
    """
    path = path or os.environ.get(MLFLOW_CONFIG_ENV) or ("mlflow.yaml" if os.path.isfile("mlflow.yaml") else None)
    values: dict[str, Any] = {}
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"MLflow settings file not found: {path}")
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a mapping of settings, got {type(values).__name__}")
    if os.environ.get("MLFLOW_TRACKING_URI"):
        values["tracking_uri"] = os.environ["MLFLOW_TRACKING_URI"]
    return MlflowSettings.model_validate(values)


def read_manifest(run_dir: str) -> dict[str, Any]:
    """Read the manifest of an earlier run: the paths and ids its tasks produced, or {} if none."""
    path = os.path.join(run_dir, MANIFEST_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def update_manifest(run_dir: str, **values: Any) -> dict[str, Any]:
    """Merge ``values`` into the run's manifest, written atomically; return the new manifest."""
    os.makedirs(run_dir, exist_ok=True)
    manifest = read_manifest(run_dir)
    manifest.update(values)
    path = os.path.join(run_dir, MANIFEST_FILE)
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2, sort_keys=True)
    os.replace(temporary, path)
    return manifest

"""Shared test setup: telemetry off, one Prefect test server per session, temporary MLflow stores."""

from __future__ import annotations

import os

# Set before Prefect or MLflow are imported by any test module.
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import pytest  # noqa: E402

from ddpm_core.parallel import configure_cpu_devices  # noqa: E402

# The same CPU device split as the CLI and the training flow, so the tests run the default path.
configure_cpu_devices()


@pytest.fixture(scope="session")
def prefect_server():
    """One real Prefect server on 127.0.0.1 for the whole session (startup costs about 13 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def mnist_dir() -> str:
    """The local folder with the original MNIST files, from DDPM_MNIST_DIR."""
    path = os.environ.get("DDPM_MNIST_DIR")
    if not path or not os.path.isdir(path):
        pytest.skip("DDPM_MNIST_DIR is not set to a folder with the four original MNIST .gz files")
    return path


@pytest.fixture()
def mlflow_settings_file(tmp_path) -> str:
    """An mlflow.yaml pointing at a fresh SQLite store and artifact folder under tmp_path."""
    path = tmp_path / "mlflow.yaml"
    path.write_text(
        f"tracking_uri: sqlite:///{tmp_path / 'mlflow.db'}\n"
        f"artifact_location: {tmp_path / 'mlartifacts'}\n"
        "experiment_name: test-ddpm\n"
        "registered_model_name: test-ddpm\n",
        encoding="utf-8",
    )
    return str(path)

"""Orchestration and tracking cost of the pipeline: the smoke flow's wall time minus training and sampling.

Runs ``flows.train_pipeline.train_pipeline`` with the smoke preset on Prefect's temporary server,
with a temporary MLflow store, Prefect home, data and output folders. ``run_training`` (inside the
train task) and ``generate`` (inside the sample task) are wrapped with timers, so

    overhead = wall time of the flow call - time in run_training - time in generate

is what Prefect, MLflow, data loading, checkpoints, export, registration and rendering add. Each
task's duration as Prefect recorded it is read back from the server for the breakdown.

Needs ``DDPM_MNIST_DIR`` (or ``--mnist-dir``): a folder with the four original MNIST .gz files.

Example:
  DDPM_MNIST_DIR=/path/to/mnist .venv/bin/python bench/pipeline_overhead.py --cpu-wall-s 900
"""

from __future__ import annotations

import argparse
import atexit
import functools
import importlib
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict

import common  # bench/common.py

# Prefect and MLflow read these when they are imported.
common.turn_off_telemetry()
WORK_DIR = tempfile.mkdtemp(prefix="ddpm-pipeline-overhead-")
# Registered first, so it runs after the exit handlers of Prefect's temporary server.
atexit.register(shutil.rmtree, WORK_DIR, ignore_errors=True)
os.environ["PREFECT_HOME"] = os.path.join(WORK_DIR, "prefect")
# Without an API URL, Prefect starts its temporary server on 127.0.0.1.
os.environ.pop("PREFECT_API_URL", None)

from prefect import get_client  # noqa: E402
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId  # noqa: E402

from flows.train_pipeline import train_pipeline  # noqa: E402
from tasks.prepare_dataset import prepare_dataset  # noqa: E402

TIMINGS: dict[str, list[float]] = defaultdict(list)


def timed(name: str, function):
    """Wrap ``function`` so each call adds its wall seconds to TIMINGS[name]."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            TIMINGS[name].append(time.perf_counter() - started)

    return wrapper


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist-dir", default=os.environ.get("DDPM_MNIST_DIR"),
                        help="folder with the original MNIST .gz files (default: $DDPM_MNIST_DIR)")
    parser.add_argument("--runs", type=int, default=2,
                        help="flow runs in this process; the first also starts Prefect's server (default: 2)")
    parser.add_argument("--cold-data", action="store_true",
                        help="count preparing the dataset in the first run instead of preparing it beforehand")
    parser.add_argument("--cpu-wall-s", type=float, default=None,
                        help="wall time in seconds of a whole cpu-preset run, to express the overhead as its share")
    common.add_record_options(parser)
    args = parser.parse_args(argv)
    if not args.mnist_dir or not os.path.isdir(args.mnist_dir):
        parser.error("set DDPM_MNIST_DIR or --mnist-dir to a folder with the four original MNIST .gz files")
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    return args


def write_mlflow_settings() -> str:
    path = os.path.join(WORK_DIR, "mlflow.yaml")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(f"tracking_uri: sqlite:///{os.path.join(WORK_DIR, 'mlflow.db')}\n"
                     f"artifact_location: {os.path.join(WORK_DIR, 'mlartifacts')}\n"
                     "experiment_name: bench-overhead\nregistered_model_name: bench-overhead\n")
    return path


def task_durations(flow_run_id) -> tuple[dict[str, float], float]:
    """Seconds each task run of the flow run took, by task name, and the flow run's own run time."""
    durations: dict[str, float] = defaultdict(float)
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    for task_run in task_runs:
        name = task_run.name.rsplit("-", 1)[0]
        durations[name] += task_run.total_run_time.total_seconds()
    return dict(durations), flow_run.total_run_time.total_seconds()


def run_flow(index: int, args: argparse.Namespace, mlflow_config: str, data_dir: str) -> dict:
    TIMINGS.clear()
    started = time.perf_counter()
    state = train_pipeline(preset="smoke", mnist_dir=args.mnist_dir, data_dir=data_dir,
                           output_dir=os.path.join(WORK_DIR, "outputs"), run_name=f"overhead-{index}",
                           mlflow_config=mlflow_config, return_state=True)
    wall = time.perf_counter() - started
    state.result()  # raises if the flow failed
    tasks_s, flow_s = task_durations(state.state_details.flow_run_id)
    training = sum(TIMINGS["run_training"])
    sampling = sum(TIMINGS["generate"])
    return {"wall": wall, "flow": flow_s, "training": training, "sampling": sampling, "tasks": tasks_s,
            "overhead": wall - training - sampling}


def render(results: list[dict], cpu_wall_s: float | None) -> str:
    headers = ["seconds"] + [f"run {index + 1}" for index in range(len(results))]
    rows = [
        ["wall time of the flow call"] + [result["wall"] for result in results],
        ["flow run time recorded by Prefect"] + [result["flow"] for result in results],
        ["inside run_training (incl. compile)"] + [result["training"] for result in results],
        ["inside generate (incl. compile)"] + [result["sampling"] for result in results],
    ]
    task_names = sorted({name for result in results for name in result["tasks"]})
    rows += [[f"task {name}"] + [result["tasks"].get(name, 0.0) for result in results] for name in task_names]
    rows.append(["**overhead** = wall - training - sampling"] + [result["overhead"] for result in results])
    rows.append(["overhead share of the smoke wall time"]
                + [f"{100 * result['overhead'] / result['wall']:.0f} %" for result in results])
    if cpu_wall_s:
        rows.append([f"overhead share of a {cpu_wall_s:.0f} s cpu-preset run"]
                    + [f"{100 * result['overhead'] / cpu_wall_s:.1f} %" for result in results])
    return common.format_table(headers, rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    other_load = common.busy_processes()
    # The task modules imported these names, so the timers replace them there. The package
    # ``tasks`` exports the task objects under the module names, hence import_module.
    train_module = importlib.import_module("tasks.train_model")
    sample_module = importlib.import_module("tasks.sample_images")
    train_module.run_training = timed("run_training", train_module.run_training)
    sample_module.generate = timed("generate", sample_module.generate)
    mlflow_config = write_mlflow_settings()
    data_dir = os.path.join(WORK_DIR, "data")
    if not args.cold_data:
        prepare_dataset.fn(data_dir=data_dir, mnist_dir=args.mnist_dir)

    results = []
    for index in range(args.runs):
        results.append(run_flow(index, args, mlflow_config, data_dir))
        print(f"run {index + 1}: wall {results[-1]['wall']:.1f} s, overhead {results[-1]['overhead']:.1f} s",
              flush=True)

    data_note = "prepared in the first run" if args.cold_data else "prepared before the first run"
    body = (f"Smoke preset, {args.runs} flow runs in one process on Prefect's temporary server; MLflow on "
            f"SQLite in a temporary folder; MNIST {data_note}. Run 1 includes starting the Prefect server "
            f"and first imports.\n\n{render(results, args.cpu_wall_s)}")
    common.finish("Pipeline overhead", body, args, common.describe_machine(other_load))
    return 0


if __name__ == "__main__":
    sys.exit(main())

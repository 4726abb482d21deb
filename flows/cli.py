"""The ``ddpm`` command line: run the pipeline, single tasks, sampling and the MLflow UI."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from typing import Any, Sequence

# Telemetry stays off unless the user turns it on; these must be set before Prefect and MLflow load.
TELEMETRY_DEFAULTS = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}
TASK_NAMES = ("prepare-dataset", "train-model", "register-model", "sample-images", "render-gif")
SAMPLER_CHOICES = ("ddpm", "ddpm_large", "ddim", "dpm_solver_pp")

logger = logging.getLogger("ddpm")


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``section.field=value``; the value is read as JSON when it parses, else as a string.

    ``14,7`` becomes [14, 7] and ``[]`` an empty list, for tuple fields.
    """
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE such as train.steps=500, got {text!r}")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise argparse.ArgumentTypeError(f"missing key in {text!r}")

    def parse_one(item: str) -> Any:
        try:
            return json.loads(item)
        except json.JSONDecodeError:
            return item

    if "," in raw and not raw.lstrip().startswith("["):
        return key.strip(), [parse_one(item) for item in raw.split(",") if item.strip()]
    return key.strip(), parse_one(raw)


def _add_mlflow_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mlflow-config", metavar="FILE",
                        help="MLflow settings file (default: $DDPM_MLFLOW_CONFIG, else ./mlflow.yaml, else built-in "
                             "defaults: SQLite file mlflow.db in the working folder)")


def _add_sampling_options(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    parser.add_argument("--num-samples", type=int, default=defaults.get("num_samples", 64),
                        help="number of images to generate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.get("seed", 0),
                        help="sampling seed; the same seed gives the same images (default: %(default)s)")
    parser.add_argument("--sampler", choices=SAMPLER_CHOICES, default="ddpm",
                        help="ddpm: ancestral with posterior variance; ddpm_large: ancestral with beta variance; "
                             "ddim: DDIM, deterministic when --eta is 0; dpm_solver_pp: DPM-Solver++(2M) (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=0,
                        help="sampling steps of ddim and dpm_solver_pp, 1 to T; 0 is the sampler's default (T for "
                             "ddim, 20 for dpm_solver_pp). Ancestral samplers always use T (default: %(default)s)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise scale, 0 to 1 (default: %(default)s)")
    parser.add_argument("--frame-every", type=int, default=defaults.get("frame_every", 20),
                        help="keep one GIF frame every this many sampling steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="images generated per compiled call; bounds memory (default: %(default)s)")
    parser.add_argument("--digits", type=int, nargs="+", metavar="DIGIT",
                        help="digits to generate, for class-conditional models (e.g. --digits 2 7 3)")
    parser.add_argument("--guidance-scale", type=float, default=2.0,
                        help="classifier-free guidance weight for --digits (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="ddpm",
        description="DDPM image generation on MNIST with JAX/Flax, orchestrated by Prefect and tracked in MLflow.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # ddpm train
    train = commands.add_parser("train", help="run the whole pipeline locally (prepare, train, register, sample)",
                                description="Run train_pipeline locally. Without PREFECT_API_URL, Prefect starts "
                                            "a temporary local server on 127.0.0.1.")
    train.add_argument("--preset", choices=("smoke", "cpu", "gpu"), default="cpu",
                       help="smoke: seconds, for tests; cpu: about 15 minutes on a 2-core CPU; gpu: full "
                            "recipe for a GPU (default: %(default)s)")
    train.add_argument("--set", dest="overrides", action="append", type=parse_override, default=[],
                       metavar="KEY=VALUE",
                       help="override a configuration value, e.g. --set train.steps=500 --set "
                            "model.attention_resolutions=14,7 (repeatable; see 'ddpm presets')")
    train.add_argument("--mnist-dir", metavar="DIR",
                       help="folder with the four original MNIST .gz files, used offline (default: "
                            "$DDPM_MNIST_DIR, else download)")
    train.add_argument("--data-dir", default="data", metavar="DIR",
                       help="where the prepared dataset is kept (default: %(default)s)")
    train.add_argument("--output-dir", default="outputs", metavar="DIR",
                       help="parent folder of run folders (default: %(default)s)")
    train.add_argument("--run-name", metavar="NAME",
                       help="run folder name; an existing run folder resumes from its latest checkpoint "
                            "(default: PRESET-DATE-TIME)")
    train.add_argument("--classifier-dir", default="classifier", metavar="DIR",
                       help="cache of the MNIST classifier used for evaluation (default: %(default)s)")
    _add_mlflow_option(train)

    # ddpm sample
    sample = commands.add_parser("sample", help="sample a GIF and a PNG grid from a registered model",
                                 description="Generate images from a registered model and log them to a new "
                                             "MLflow run.")
    sample.add_argument("model", nargs="?", default="@champion",
                        help="NAME@alias, NAME/VERSION, @alias, a version number, or a models:/ URI "
                             "(default: %(default)s)")
    _add_sampling_options(sample, {})
    sample.add_argument("--output-dir", default="outputs", metavar="DIR",
                        help="parent folder of the sample folder (default: %(default)s)")
    _add_mlflow_option(sample)

    # ddpm task NAME --run-dir DIR
    task = commands.add_parser("task", help="run one task locally from the outputs of an earlier run",
                               description="Run one task outside Prefect's engine (easy to debug), taking its "
                                           "inputs from RUN_DIR/run.json, which every pipeline run writes.")
    task.add_argument("name", choices=TASK_NAMES, help="the task to run")
    task.add_argument("--run-dir", required=True, metavar="DIR", help="run folder of an earlier run")
    task.add_argument("--mnist-dir", metavar="DIR", help="prepare-dataset: local MNIST folder")
    task.add_argument("--data-dir", default="data", metavar="DIR",
                      help="prepare-dataset: where the prepared dataset is kept (default: %(default)s)")

    # ddpm ui
    ui = commands.add_parser("ui", help="start the MLflow UI with the settings of mlflow.yaml")
    _add_mlflow_option(ui)
    ui.add_argument("--host", help="address to bind (default: ui_host of the settings, 127.0.0.1)")
    ui.add_argument("--port", type=int, help="port (default: ui_port of the settings, 5000)")

    # ddpm presets
    commands.add_parser("presets", help="print the presets as JSON")
    return parser


def run_train(args: argparse.Namespace) -> int:
    from ddpm_core.config import make_config

    overrides = dict(args.overrides)
    make_config(args.preset, overrides)  # rejects bad values before Prefect starts
    from flows.train_pipeline import train_pipeline

    result = train_pipeline(preset=args.preset, overrides=overrides, mnist_dir=args.mnist_dir,
                            data_dir=args.data_dir, output_dir=args.output_dir, run_name=args.run_name,
                            mlflow_config=args.mlflow_config, classifier_dir=args.classifier_dir)
    print(json.dumps(result, indent=2))
    return 0


def validate_sampling(args: argparse.Namespace) -> None:
    """Reject sampling options outside their ranges before any model is loaded."""
    checks = [("--num-samples", args.num_samples, 1), ("--frame-every", args.frame_every, 0),
              ("--batch-size", args.batch_size, 1), ("--steps", args.steps, 0), ("--seed", args.seed, 0)]
    for name, value, minimum in checks:
        if value < minimum:
            raise ValueError(f"{name} must be at least {minimum}, got {value}")
    bad_digits = [digit for digit in args.digits or [] if not 0 <= digit <= 9]
    if bad_digits:
        raise ValueError(f"--digits must be in [0, 9], got {bad_digits}")
    if not 0.0 <= args.eta <= 1.0:
        raise ValueError(f"--eta must be in [0, 1], got {args.eta}")


def run_sample(args: argparse.Namespace) -> int:
    validate_sampling(args)
    from flows.sample_pipeline import sample_pipeline

    result = sample_pipeline(model=args.model, num_samples=args.num_samples, seed=args.seed, sampler=args.sampler,
                             steps=args.steps, eta=args.eta, frame_every=args.frame_every,
                             batch_size=args.batch_size, digits=args.digits, guidance_scale=args.guidance_scale,
                             output_dir=args.output_dir, mlflow_config=args.mlflow_config)
    print(json.dumps(result, indent=2))
    return 0


def _require(manifest: dict[str, Any], key: str, run_dir: str, producer: str) -> Any:
    if key not in manifest:
        raise ValueError(f"{run_dir}/run.json has no {key}; run 'ddpm task {producer} --run-dir {run_dir}' first")
    return manifest[key]


def run_task(args: argparse.Namespace) -> int:
    from tasks import prepare_dataset, register_model, render_gif, sample_images, train_model
    from ddpm_core.config import PipelineConfig
    from tasks.settings import read_manifest, update_manifest

    run_dir = os.path.abspath(args.run_dir)
    manifest = read_manifest(run_dir)
    if not manifest:
        raise ValueError(f"no run.json in {run_dir}; pass the folder of an earlier 'ddpm train' run")
    config = PipelineConfig.model_validate(_require(manifest, "config", run_dir, "train-model"))
    tracking_uri = manifest.get("tracking_uri")

    if args.name == "prepare-dataset":
        result = prepare_dataset.fn(data_dir=args.data_dir, mnist_dir=args.mnist_dir)
        update_manifest(run_dir, dataset_dir=result)
    elif args.name == "train-model":
        dataset_dir = _require(manifest, "dataset_dir", run_dir, "prepare-dataset")
        result = train_model.fn(config.model_dump(mode="json"), dataset_dir, run_dir,
                                manifest.get("mlflow_run_id"), tracking_uri)
        update_manifest(run_dir, model_dir=result)
    elif args.name == "register-model":
        model_dir = _require(manifest, "model_dir", run_dir, "train-model")
        result = register_model.fn(model_dir, _require(manifest, "mlflow_run_id", run_dir, "train-model"),
                                   manifest["model_name"], tracking_uri,
                                   flow_run_id=manifest.get("prefect_flow_run_id"))
        update_manifest(run_dir, model_version=result, model_uri=f"models:/{manifest['model_name']}/{result}")
    elif args.name == "sample-images":
        model_uri = _require(manifest, "model_uri", run_dir, "register-model")
        result = sample_images.fn(model_uri, tracking_uri, os.path.join(run_dir, "samples"),
                                  num_samples=config.sample.num_samples, seed=config.sample.seed,
                                  frame_every=config.sample.frame_every)
        update_manifest(run_dir, samples_path=result)
    elif args.name == "render-gif":
        samples_path = _require(manifest, "samples_path", run_dir, "sample-images")
        sample = config.sample
        result = render_gif.fn(samples_path, os.path.join(run_dir, "samples"), manifest.get("mlflow_run_id"),
                               tracking_uri, grid_cols=sample.grid_cols, upscale=sample.upscale,
                               frame_duration_ms=sample.frame_duration_ms, final_hold_ms=sample.final_hold_ms)
        update_manifest(run_dir, gif_path=result[0], png_path=result[1])
    else:
        raise ValueError(f"unknown task {args.name!r}; choose one of {TASK_NAMES}")
    print(json.dumps(result))
    return 0


def run_ui(args: argparse.Namespace) -> int:
    from tasks.settings import load_mlflow_settings

    settings = load_mlflow_settings(args.mlflow_config)
    host = args.host or settings.ui_host
    port = args.port or settings.ui_port
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", settings.resolved_tracking_uri(),
               "--default-artifact-root", settings.resolved_artifact_location(), "--host", host,
               "--port", str(port)]
    env = dict(os.environ)
    # One server process instead of about ten; the UI needs no background job runner.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    logger.info("Starting the MLflow UI on http://%s:%d (Ctrl+C stops it)", host, port)
    try:
        return subprocess.call(command, env=env)
    except KeyboardInterrupt:
        return 130


def run_presets(args: argparse.Namespace) -> int:
    from ddpm_core.config import PRESETS, make_config

    print(json.dumps({name: make_config(name).model_dump(mode="json") for name in PRESETS}, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ddpm`` console command; returns the exit status."""
    args = build_parser().parse_args(argv)
    for name, value in TELEMETRY_DEFAULTS.items():
        os.environ.setdefault(name, value)
    from ddpm_core.parallel import configure_cpu_devices

    try:
        configure_cpu_devices()  # before any JAX computation: one CPU device per core for training
    except ValueError as error:
        print(f"ddpm: error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("jax._src.xla_bridge", "absl", "orbax", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from mlflow.exceptions import MlflowException

    handlers = {"train": run_train, "sample": run_sample, "task": run_task, "ui": run_ui, "presets": run_presets}
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError, MlflowException) as error:
        print(f"ddpm {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

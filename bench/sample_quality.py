"""Sample quality of one trained model against the sampler, its steps and the number of samples.

For each sampler and each n, the script generates n images from the model (seed 0) and scores
them with the evaluator of the pipeline (``ddpm_core.evaluate``, the MNIST classifier's features).
It reports the Fréchet distance beside the real-data floor at the same n, the confident share, the
digit shares and the sampling speed. A class-conditional model is also scored on requested
digits with classifier-free guidance.

The model is an exported model folder (``outputs/<run>/model`` of a pipeline run) or a
registered MLflow model URI.

Examples:
  .venv/bin/python bench/sample_quality.py outputs/cpu-20261204-120000/model --num-samples 2000 10000
  .venv/bin/python bench/sample_quality.py models:/ddpm-mnist@champion \\
      --samplers ddpm ddim:10 ddim:20 ddim:50 ddim:100 dpm_solver_pp:10 dpm_solver_pp:20 --num-samples 1000
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from ddpm_core.parallel import configure_cpu_devices

configure_cpu_devices()

import common  # noqa: E402  bench/common.py, imports JAX
import numpy as np  # noqa: E402

from ddpm_core.checkpoint import load_model  # noqa: E402
from ddpm_core.classifier import load_or_train_classifier  # noqa: E402
from ddpm_core.data import load_split, prepare_mnist  # noqa: E402
from ddpm_core.evaluate import evaluate_samples, per_class_accuracy  # noqa: E402
from ddpm_core.generate import generate  # noqa: E402
from sample_throughput import parse_sampler  # noqa: E402  bench/sample_throughput.py


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="exported model folder, or an MLflow model URI such as models:/NAME@champion")
    parser.add_argument("--samplers", nargs="+", type=parse_sampler, default=[("ddim", 25)],
                        help="NAME or NAME:STEPS (default: ddim:25)")
    parser.add_argument("--num-samples", nargs="+", type=int, default=[1000],
                        help="sample counts n to score; each is also the n of the Fréchet distances (default: 1000)")
    parser.add_argument("--guidance-scale", type=float, default=2.0,
                        help="guidance of the per-digit samples of class-conditional models (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=500, help="images per sampling batch (default: %(default)s)")
    parser.add_argument("--data-dir", default="data", help="where MNIST is prepared (default: %(default)s)")
    parser.add_argument("--mnist-dir", default=None, help="folder of the original MNIST files (default: $DDPM_MNIST_DIR)")
    parser.add_argument("--classifier-dir", default="classifier",
                        help="cache of the evaluation classifier (default: %(default)s)")
    parser.add_argument("--mlflow-config", default=None, help="MLflow settings file, for a model URI")
    common.add_record_options(parser)
    args = parser.parse_args(argv)
    if min(args.num_samples) < 2:
        parser.error("--num-samples values must be at least 2")
    return args


def load(model: str, mlflow_config: str | None):
    if os.path.isdir(model):
        return load_model(model)
    from tasks.sample_images import load_registered
    from tasks.settings import load_mlflow_settings

    return load_registered(model, load_mlflow_settings(mlflow_config).resolved_tracking_uri())


def main(argv=None) -> int:
    args = parse_args(argv)
    common.turn_off_telemetry()
    other_load = common.busy_processes()
    apply_fn, params, config = load(args.model, args.mlflow_config)
    dataset_dir = prepare_mnist(args.data_dir, args.mnist_dir)
    classifier = load_or_train_classifier(dataset_dir, args.classifier_dir)
    train_images, _ = load_split(dataset_dir, "train")
    test_images, _ = load_split(dataset_dir, "test")
    conditional = config.model.num_classes > 0

    rows = []
    for sampler, steps in args.samplers:
        label = sampler if sampler.startswith("ddpm") else f"{sampler}-{steps}"
        if sampler.startswith("ddpm"):
            label = f"{sampler}-{config.diffusion.num_timesteps}"
        for n in args.num_samples:
            # One small call first, so that the timing below leaves out compilation.
            generate(apply_fn, params, config, num_samples=min(n, args.batch_size), seed=99, sampler=sampler,
                     steps=steps, batch_size=args.batch_size)
            started = time.perf_counter()
            samples, _ = generate(apply_fn, params, config, num_samples=n, seed=0, sampler=sampler, steps=steps,
                                  batch_size=args.batch_size)
            seconds = time.perf_counter() - started
            result = evaluate_samples(samples, classifier, test_images, train_images, n=n, seed=0)
            shares = np.asarray(result.class_histogram)
            accuracy = ""
            if conditional and n == min(args.num_samples) and (sampler, steps) == args.samplers[0]:
                digits = list(range(config.model.num_classes))
                guided, _ = generate(apply_fn, params, config, num_samples=n, seed=1, sampler=sampler, steps=steps,
                                     batch_size=args.batch_size, digits=digits, guidance_scale=args.guidance_scale)
                overall, per_digit = per_class_accuracy(guided, np.resize(np.asarray(digits), n), classifier)
                guided_result = evaluate_samples(guided, classifier, test_images, train_images, n=n, seed=0)
                accuracy = (f"{100 * overall:.1f} % (lowest digit {100 * np.nanmin(per_digit):.1f} %); guided "
                            f"samples of all digits: Fréchet distance {guided_result.frechet_distance:.2f}, "
                            f"{100 * guided_result.confident_share:.1f} % confident")
            row = [label, f"{n:,}", f"{result.frechet_distance:.2f}", f"{result.real_floor:.2f}",
                   f"{result.frechet_distance / result.real_floor:.1f}", f"{100 * result.confident_share:.1f} %",
                   f"{100 * shares.min():.1f}-{100 * shares.max():.1f} %", f"{result.class_kl_from_uniform:.4f}",
                   f"{result.nearest_train_median:.2f}", accuracy, f"{n / seconds:.1f}"]
            print(" | ".join(row), flush=True)
            rows.append(row)

    headers = ["sampler", "n", "Fréchet distance", "real-data floor", "ratio", "confident", "digit shares (min-max)",
               "class KL", "nearest-training median", f"conditional accuracy (guidance {args.guidance_scale:g})",
               "images/s"]
    body = (f"Model `{args.model}` (preset `{config.preset}`, T = {config.diffusion.num_timesteps}, "
            f"{config.train.steps} training steps{', class-conditional' if conditional else ''}); MNIST classifier "
            f"with test accuracy {classifier.test_accuracy:.4f}; seed 0. The other columns score unconditional "
            f"samples, and images/s counts their sampling alone, without compilation.\n\n" + common.format_table(headers, rows))
    common.finish("Sample quality", body, args, common.describe_machine(other_load))
    return 0


if __name__ == "__main__":
    sys.exit(main())

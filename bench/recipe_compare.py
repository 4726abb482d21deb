"""Training recipes compared at one short CPU budget: each variant trains, samples and is scored.

Every variant is the `cpu` preset plus a few overrides, trained for the same number of steps
from the same seed, then scored with the evaluator of the pipeline (``ddpm_core.evaluate``) on
samples of its EMA weights. Class-conditional variants are scored twice: unconditionally (the null
label), like the others, and on requested digits with classifier-free guidance.

The budget is far below the preset's, so the table ranks what helps early in training. A recipe
that only pays off later can lose here.

Examples:
  .venv/bin/python bench/recipe_compare.py --data-dir /tmp/ddpm-data --classifier-dir /tmp/ddpm-cls
  .venv/bin/python bench/recipe_compare.py --variants baseline cosine v --steps 400 --num-samples 500
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

from ddpm_core.classifier import load_or_train_classifier  # noqa: E402
from ddpm_core.config import make_config  # noqa: E402
from ddpm_core.data import load_split, prepare_mnist  # noqa: E402
from ddpm_core.evaluate import conditional_accuracy, evaluate_samples  # noqa: E402
from ddpm_core.generate import generate  # noqa: E402
from ddpm_core.train import create_trainer, run_training  # noqa: E402

# Overrides of each variant on top of the `cpu` preset.
VARIANTS: dict[str, dict[str, object]] = {
    "baseline": {},
    "cosine": {"diffusion.schedule": "cosine"},
    "x_start": {"diffusion.prediction_type": "x_start"},
    "v": {"diffusion.prediction_type": "v"},
    "min_snr": {"diffusion.loss_weighting": "min_snr"},
    "ema_0.999": {"train.ema_decay": 0.999},
    "no_ema_warmup": {"train.ema_warmup": False},
    "lr_constant": {"train.lr_schedule": "constant"},
    "lr_1e-3": {"train.learning_rate": 1e-3},
    "width_24": {"model.base_channels": 24, "model.num_groups": 8},
    "conditional": {"model.num_classes": 10},
    "x_start_conditional": {"diffusion.prediction_type": "x_start", "model.num_classes": 10},
    "min_snr_conditional": {"diffusion.loss_weighting": "min_snr", "model.num_classes": 10},
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="variants to run, in order (default: all)")
    parser.add_argument("--steps", type=int, default=600, help="optimiser steps per variant (default: %(default)s)")
    parser.add_argument("--num-samples", type=int, default=1000,
                        help="samples scored per variant, also the n of the Fréchet distances (default: %(default)s)")
    parser.add_argument("--sampler", default="ddim", help="sampler of the scored samples (default: %(default)s)")
    parser.add_argument("--sample-steps", type=int, default=25, help="steps of that sampler (default: %(default)s)")
    parser.add_argument("--guidance-scale", type=float, default=2.0,
                        help="guidance scale of the conditional samples (default: %(default)s)")
    parser.add_argument("--data-dir", default="data", help="where MNIST is prepared (default: %(default)s)")
    parser.add_argument("--mnist-dir", default=None, help="folder of the original MNIST files (default: $DDPM_MNIST_DIR)")
    parser.add_argument("--classifier-dir", default="classifier",
                        help="cache of the evaluation classifier (default: %(default)s)")
    common.add_record_options(parser)
    args = parser.parse_args(argv)
    if args.steps < 4 or args.steps % 4:
        parser.error(f"--steps must be a positive multiple of 4 (the preset's steps per dispatch), got {args.steps}")
    if args.num_samples < 2:
        parser.error(f"--num-samples must be at least 2, got {args.num_samples}")
    return args


def run_variant(name: str, args: argparse.Namespace, dataset_dir: str, classifier, splits) -> list[object]:
    """Train one variant and score it; return its table row."""
    (train_images, train_labels), (test_images, _) = splits
    overrides = dict(VARIANTS[name])
    overrides.update({"train.steps": args.steps, "train.warmup_steps": min(100, args.steps // 4),
                      "train.checkpoint_every": args.steps, "train.log_every": args.steps})
    config = make_config("cpu", overrides)
    trainer, state = create_trainer(config)
    started = time.perf_counter()
    state = run_training(trainer, state, train_images, train_labels)
    train_seconds = time.perf_counter() - started
    apply_fn = trainer.apply

    samples, _ = generate(apply_fn, state.ema_params, config, num_samples=args.num_samples, seed=0,
                          sampler=args.sampler, steps=args.sample_steps, batch_size=250)
    result = evaluate_samples(samples, classifier, test_images, train_images, n=args.num_samples, seed=0)
    accuracy = ""
    if config.model.num_classes:
        digits = list(range(config.model.num_classes))
        guided, _ = generate(apply_fn, state.ema_params, config, num_samples=args.num_samples, seed=1,
                             sampler=args.sampler, steps=args.sample_steps, batch_size=250, digits=digits,
                             guidance_scale=args.guidance_scale)
        requested = np.resize(np.asarray(digits), args.num_samples)
        accuracy = f"{100 * conditional_accuracy(guided, requested, classifier):.1f} %"
    shares = np.asarray(result.class_histogram)
    row = [name, ", ".join(f"{key}={value}" for key, value in VARIANTS[name].items()) or "(preset)",
           f"{result.frechet_distance:.1f}", f"{result.real_floor:.1f}", f"{100 * result.confident_share:.1f} %",
           f"{100 * shares.min():.1f}-{100 * shares.max():.1f} %", f"{result.class_kl_from_uniform:.3f}", accuracy,
           f"{train_seconds:.0f}"]
    print(" | ".join(str(cell) for cell in row), flush=True)
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    other_load = common.busy_processes()
    dataset_dir = prepare_mnist(args.data_dir, args.mnist_dir)
    classifier = load_or_train_classifier(dataset_dir, args.classifier_dir)
    splits = (load_split(dataset_dir, "train"), load_split(dataset_dir, "test"))

    rows = [run_variant(name, args, dataset_dir, classifier, splits) for name in args.variants]
    headers = ["variant", "overrides of the cpu preset", "Fréchet distance", "real-data floor", "confident",
               "digit shares (min-max)", "class KL", f"conditional accuracy (guidance {args.guidance_scale:g})",
               "train s"]
    machine = common.describe_machine(other_load)
    body = (f"`cpu` preset, {args.steps} steps of 64 images per variant (seed 0), "
            f"{args.num_samples} {args.sampler}-{args.sample_steps} samples of the EMA weights scored with the "
            f"MNIST classifier (test accuracy {classifier.test_accuracy:.4f}), n = {args.num_samples}.\n\n"
            + common.format_table(headers, rows))
    common.finish("Training recipes at a fixed budget", body, args, machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())

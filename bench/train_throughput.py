"""Training throughput of the compiled train step: images/s, achieved GFLOP/s, compile time, memory.

Runs the project's own train step (``ddpm_core.train``) on a synthetic uint8 training set of
MNIST's size, for every combination of the given batch sizes and steps per dispatch. FLOPs come
from XLA's cost analysis of the compiled one-step function. The reference peak is the best
GFLOP/s of a float32 2048 x 2048 ``jnp.dot`` measured in the same process.

Examples:
  .venv/bin/python bench/train_throughput.py                      # cpu preset, batch 64
  .venv/bin/python bench/train_throughput.py --batch-size 32 64 128 --steps-per-dispatch 1 2 5
  .venv/bin/python bench/train_throughput.py --loop scan unrolled --steps-per-dispatch 5
  .venv/bin/python bench/train_throughput.py --compare-xla-flags="--xla_cpu_enable_fast_math=true"
  DDPM_CPU_DEVICES=1 .venv/bin/python bench/train_throughput.py   # one CPU device for all cores

Like the ``ddpm`` command, the script splits the CPU into one device per core unless
``DDPM_CPU_DEVICES`` or ``XLA_FLAGS`` says otherwise (``ddpm_core.parallel.configure_cpu_devices``).
A value of ``--compare-xla-flags`` that starts with ``--`` must be joined with ``=`` as above.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

from ddpm_core.parallel import configure_cpu_devices

configure_cpu_devices()

import common  # noqa: E402  bench/common.py
import jax  # noqa: E402

from ddpm_core.config import make_config
from ddpm_core.parallel import put_replicated, replicated
from ddpm_core.train import compile_train_chunk, create_trainer
from flows.cli import parse_override

LOOPS = ("auto", "scan", "unrolled")
MNIST_TRAIN_SIZE = 60_000


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", help="configuration preset of the model (default: cpu)")
    parser.add_argument("--set", dest="overrides", action="append", type=parse_override, default=[],
                        metavar="KEY=VALUE", help="configuration override, e.g. model.base_channels=32")
    parser.add_argument("--batch-size", type=int, nargs="+", default=None,
                        help="global batch sizes in images (default: the preset's)")
    parser.add_argument("--steps-per-dispatch", type=int, nargs="+", default=[1],
                        help="optimiser steps per compiled call (default: 1)")
    parser.add_argument("--loop", choices=LOOPS, nargs="+", default=["auto"],
                        help="auto: the trainer's own choice (steps traced one after another on the CPU); "
                             "scan: force lax.scan; unrolled: force traced steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed dispatches after compiling (default: 3)")
    parser.add_argument("--steps", type=int, default=60,
                        help="timed optimiser steps per repeat, rounded up to whole dispatches (default: 60)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed repeats, taken round all variants in turn; the median is reported (default: 3)")
    parser.add_argument("--compare-xla-flags", nargs="+", default=None, metavar="FLAGS",
                        help="also run each XLA_FLAGS value in a subprocess and compare with the current one")
    parser.add_argument("--json", action="store_true", help="print one JSON object per row (used by subprocesses)")
    common.add_record_options(parser)
    args = parser.parse_args(argv)
    for name in ("warmup", "steps", "repeats"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            parser.error(f"--{name} must be at least {0 if name == 'warmup' else 1}, got {getattr(args, name)}")
    if any(value < 1 for value in (args.batch_size or []) + args.steps_per_dispatch):
        parser.error("--batch-size and --steps-per-dispatch values must be at least 1")
    return args


def build_config(args: argparse.Namespace, batch_size: int | None, steps_per_dispatch: int):
    """Build the preset plus overrides, with run-length fields made multiples of ``steps_per_dispatch``."""
    overrides = dict(args.overrides)
    if batch_size is not None:
        overrides["train.batch_size"] = batch_size
    overrides.update({"train.steps_per_dispatch": steps_per_dispatch, "train.steps": 100 * steps_per_dispatch,
                      "train.log_every": steps_per_dispatch, "train.checkpoint_every": 100 * steps_per_dispatch})
    return make_config(args.preset, overrides)


def make_chunk(trainer, loop: str):
    """Jit the chunk function for ``loop``; "auto" is exactly what training uses."""
    if loop == "auto":
        return compile_train_chunk(trainer)
    steps = trainer.config.train.steps_per_dispatch

    def scan_chunk(state, images, labels):
        def body(carry, _):
            return trainer.train_step(carry, images, labels)

        return jax.lax.scan(body, state, None, length=steps)

    def unrolled_chunk(state, images, labels):
        history = []
        for _ in range(steps):
            state, metrics = trainer.train_step(state, images, labels)
            history.append(metrics)
        return state, jax.tree.map(lambda *values: jax.numpy.stack(values), *history)

    chunk = scan_chunk if loop == "scan" else unrolled_chunk
    return jax.jit(chunk, donate_argnums=0, out_shardings=replicated(trainer.mesh))


def step_flops(trainer, state, images, labels) -> float:
    """Return the FLOPs of one optimiser step from XLA's cost analysis of the compiled single step.

    The analysis of a partitioned step counts one device's share, so it is multiplied by the
    number of devices of the mesh.
    """
    compiled = jax.jit(trainer.train_step).lower(state, images, labels).compile()
    return common.cost_flops(compiled) * trainer.mesh.size


class Variant:
    """One compiled configuration, ready to time: trainer, state, data and the compiled chunk."""

    def __init__(self, args, batch_size, steps_per_dispatch, loop, flops_cache):
        config = build_config(args, batch_size, steps_per_dispatch)
        trainer, self.state = create_trainer(config)
        self.batch = config.train.batch_size
        self.steps_per_dispatch = steps_per_dispatch
        self.loop = loop
        rng = np.random.default_rng(0)
        self.images = put_replicated(rng.integers(0, 256, (MNIST_TRAIN_SIZE, 28, 28, 1), dtype=np.uint8),
                                     trainer.mesh)
        self.labels = put_replicated(rng.integers(0, 10, MNIST_TRAIN_SIZE, dtype=np.int32), trainer.mesh)

        started = time.perf_counter()
        self.compiled = make_chunk(trainer, loop).lower(self.state, self.images, self.labels).compile()
        self.compile_s = time.perf_counter() - started

        # One compiled step without a loop gives the per-step FLOPs: a while loop's cost analysis
        # would not multiply its body by the trip count.
        if self.batch not in flops_cache:
            if steps_per_dispatch == 1 and loop != "scan":
                xla_flops = common.cost_flops(self.compiled) * trainer.mesh.size
            else:
                xla_flops = step_flops(trainer, self.state, self.images, self.labels)
            jaxpr = jax.make_jaxpr(trainer.train_step)(self.state, self.images, self.labels).jaxpr
            flops_cache[self.batch] = (xla_flops, common.matmul_conv_flops(jaxpr))
        self.flops, self.dense_flops = flops_cache[self.batch]

        for _ in range(args.warmup):
            self.state, _ = self.compiled(self.state, self.images, self.labels)
        jax.block_until_ready(self.state)
        self.dispatches = math.ceil(args.steps / steps_per_dispatch)
        self.rates: list[float] = []
        self.other_cores: list[float] = []

    def time_once(self) -> None:
        """Run the timed dispatches once; record images/s and the cores other processes used meanwhile."""
        other_load = common.OtherLoad()
        started = time.perf_counter()
        for _ in range(self.dispatches):
            self.state, _ = self.compiled(self.state, self.images, self.labels)
        jax.block_until_ready(self.state)
        duration = time.perf_counter() - started
        self.rates.append(self.dispatches * self.steps_per_dispatch * self.batch / duration)
        cores = other_load.cores()
        if cores is not None:
            self.other_cores.append(cores)

    def row(self, peak_gflops: float) -> dict:
        rate = common.median(self.rates)
        gflops = self.flops * rate / self.batch / 1e9
        return {
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "batch": self.batch,
            "steps_per_dispatch": self.steps_per_dispatch,
            "loop": self.loop,
            "images_per_s": rate,
            "images_per_s_min": min(self.rates),
            "images_per_s_max": max(self.rates),
            "ms_per_step": 1e3 * self.batch / rate,
            "gflop_per_step": self.flops / 1e9,
            "dense_gflop_per_step": self.dense_flops / 1e9,
            "gflops": gflops,
            "peak_share": gflops / peak_gflops if peak_gflops else float("nan"),
            "matmul_peak_gflops": peak_gflops,
            "compile_s": self.compile_s,
            "peak_rss_mib": common.peak_rss_mib(),
            "other_cores": common.median(self.other_cores) if self.other_cores else None,
        }


def run_with_flags(flags: str, args: argparse.Namespace) -> list[dict]:
    """Run this script with ``XLA_FLAGS=flags`` in a subprocess and return its rows."""
    argv = [sys.executable, os.path.abspath(__file__), "--json", "--no-record", "--preset", args.preset,
            "--steps-per-dispatch", *map(str, args.steps_per_dispatch), "--loop", *args.loop,
            "--warmup", str(args.warmup), "--steps", str(args.steps), "--repeats", str(args.repeats)]
    if args.batch_size:
        argv += ["--batch-size", *map(str, args.batch_size)]
    for key, value in args.overrides:
        argv += ["--set", f"{key}={json.dumps(value)}"]
    env = dict(os.environ, XLA_FLAGS=flags)
    result = subprocess.run(argv, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"XLA_FLAGS={flags!r} failed with exit status {result.returncode}:\n{result.stderr[-2000:]}",
              file=sys.stderr)
        return [{"xla_flags": flags, "error": result.stderr.strip().splitlines()[-1] if result.stderr else "failed"}]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def render(rows: list[dict], with_flags: bool) -> str:
    headers = ["batch", "steps/dispatch", "loop", "images/s (median)", "range", "ms/step", "GFLOP/step",
               "conv+matmul GFLOP/step", "GFLOP/s", "share of matmul peak", "compile s", "peak RSS MiB",
               "other processes (cores, median)"]
    if with_flags:
        headers = ["XLA_FLAGS"] + headers
    table_rows = []
    for row in rows:
        if "error" in row:
            table_rows.append([row["xla_flags"] or "(none)", f"failed: {row['error']}"] + [""] * (len(headers) - 2))
            continue
        cells = [row["batch"], row["steps_per_dispatch"], row["loop"], row["images_per_s"],
                 f"{row['images_per_s_min']:.0f}-{row['images_per_s_max']:.0f}", row["ms_per_step"],
                 row["gflop_per_step"], row["dense_gflop_per_step"], row["gflops"], f"{100 * row['peak_share']:.1f} %", row["compile_s"],
                 row["peak_rss_mib"], "?" if row["other_cores"] is None else f"{row['other_cores']:.2f}"]
        table_rows.append(([row["xla_flags"] or "(none)"] if with_flags else []) + cells)
    return common.format_table(headers, table_rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    other_load = common.busy_processes()
    peak_gflops = common.measure_matmul_peak()
    flops_cache: dict[int, tuple[float, float]] = {}
    variants = [Variant(args, batch_size, steps_per_dispatch, loop, flops_cache)
                for batch_size in args.batch_size or [None]
                for steps_per_dispatch in args.steps_per_dispatch
                for loop in args.loop]
    # Repeats go round all variants in turn, so load that comes and goes hits every variant alike.
    for _ in range(args.repeats):
        for variant in variants:
            variant.time_once()
    rows = [variant.row(peak_gflops) for variant in variants]
    if args.json:
        for row in rows:
            print(json.dumps(row), flush=True)
        return 0
    print(render(rows, False), flush=True)

    for flags in args.compare_xla_flags or []:
        rows += run_with_flags(flags, args)
    body = (f"Preset `{args.preset}`, {args.steps} timed steps x {args.repeats} repeats after {args.warmup} "
            f"warm-up dispatches; fp32 2048x2048 matmul peak in this process: {peak_gflops:.1f} GFLOP/s. "
            "GFLOP/step is XLA's cost analysis of the compiled step, which counts elementwise work too; "
            "conv+matmul counts 2 x multiply-adds of convolutions and matrix products only. GFLOP/s and the "
            "share of the peak use the XLA figure.\n\n" + render(rows, bool(args.compare_xla_flags)))
    common.finish("Training throughput", body, args, common.describe_machine(other_load))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time profile of the train step: a jax.profiler trace, summed by kind of XLA operation.

The script compiles the project's train step, runs a few dispatches under ``jax.profiler``, reads
the trace back with JAX's own reader (``jax.profiler.ProfileData``) and sums the time of every
executed XLA operation. Operations are grouped by the fusion kind XLA gave them and by the JAX
primitive they came from (from the compiled HLO's metadata). The trace folder is kept, so it can
also be opened in Perfetto or TensorBoard.

Examples:
  .venv/bin/python bench/profile_train_step.py
  DDPM_CPU_DEVICES=1 .venv/bin/python bench/profile_train_step.py --dispatches 3
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import sys
import tempfile
import time

from ddpm_core.parallel import configure_cpu_devices

configure_cpu_devices()

import common  # noqa: E402  bench/common.py, imports JAX
import jax  # noqa: E402
import numpy as np  # noqa: E402

from ddpm_core.config import make_config  # noqa: E402
from ddpm_core.parallel import put_replicated  # noqa: E402
from ddpm_core.train import compile_train_chunk, create_trainer  # noqa: E402
from flows.cli import parse_override  # noqa: E402

# name = shape fusion(...) ... op_name="jit(train_chunk)/.../primitive"
HLO_LINE = re.compile(r'^\s*%?([\w.\-]+) = \S+ .*?op_name="([^"]+)"')


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu", help="configuration preset (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", type=parse_override, default=[],
                        metavar="KEY=VALUE", help="configuration override, e.g. train.steps_per_dispatch=1")
    parser.add_argument("--dispatches", type=int, default=5, help="traced dispatches (default: %(default)s)")
    parser.add_argument("--top", type=int, default=15, help="rows of the table (default: %(default)s)")
    parser.add_argument("--trace-dir", default=None, help="where to keep the trace (default: a temporary folder)")
    common.add_record_options(parser)
    return parser.parse_args(argv)


def primitive_of(hlo_text: str) -> dict[str, str]:
    """Map each HLO instruction name to the last part of its JAX op_name, such as conv_general_dilated."""
    names = {}
    for line in hlo_text.splitlines():
        match = HLO_LINE.match(line)
        if match:
            path = match.group(2)
            primitive = path.split("/")[-1].rstrip(")")
            names[match.group(1)] = f"{primitive} (backward)" if "transpose(" in path else primitive
    return names


def main(argv=None) -> int:
    args = parse_args(argv)
    other_load = common.busy_processes()
    config = make_config(args.preset, dict(args.overrides))
    trainer, state = create_trainer(config)
    rng = np.random.default_rng(0)
    images = put_replicated(rng.integers(0, 256, (60_000, 28, 28, 1), dtype=np.uint8), trainer.mesh)
    labels = put_replicated(rng.integers(0, 10, 60_000).astype(np.int32), trainer.mesh)
    train_chunk = compile_train_chunk(trainer)
    compiled = train_chunk.lower(state, images, labels).compile()
    names = primitive_of(compiled.as_text())
    for _ in range(3):
        state, _ = compiled(state, images, labels)
    jax.block_until_ready(state)

    steps = args.dispatches * config.train.steps_per_dispatch
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="ddpm-trace-")
    jax.profiler.start_trace(trace_dir)
    started = time.perf_counter()
    for _ in range(args.dispatches):
        state, _ = compiled(state, images, labels)
    jax.block_until_ready(state)
    wall_ms = (time.perf_counter() - started) * 1000 / steps
    jax.profiler.stop_trace()

    path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
    profile = jax.profiler.ProfileData.from_file(path)
    by_kind: collections.Counter = collections.Counter()
    counts: collections.Counter = collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in names:
                    kind = (re.sub(r"\.\d+$", "", event.name), names[event.name])
                    by_kind[kind] += event.duration_ns
                    counts[kind] += 1
    total_ns = sum(by_kind.values())
    devices = jax.device_count()
    rows = [[fusion, primitive, f"{ns / 1e6 / steps:.1f}", f"{100 * ns / total_ns:.1f} %",
             f"{counts[(fusion, primitive)] / steps / devices:.0f}"]
            for (fusion, primitive), ns in by_kind.most_common(args.top)]
    body = (f"Preset `{args.preset}`, batch {config.train.batch_size} over {devices} device(s), "
            f"{config.train.steps_per_dispatch} steps per dispatch, {steps} traced steps: {wall_ms:.0f} ms of wall "
            f"time per step ({config.train.batch_size * 1000 / wall_ms:.0f} images/s under the profiler). XLA "
            f"operations took {total_ns / 1e6 / steps:.0f} ms per step summed over all threads and devices. "
            f"Trace: `{trace_dir}`.\n\n"
            + common.format_table(["XLA fusion kind", "from JAX primitive", "ms per step", "share",
                                   "ops per step per device"], rows))
    common.finish("Train step profile", body, args, common.describe_machine(other_load))
    return 0


if __name__ == "__main__":
    sys.exit(main())

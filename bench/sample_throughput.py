"""Sampling throughput: one network forward (one denoising step), and whole batches through generate.

The model is the preset's U-Net with freshly initialised weights; sampling speed does not depend on
the weight values. The first ``generate`` call of each sampler compiles it and is reported apart.

Examples:
  .venv/bin/python bench/sample_throughput.py                      # cpu preset, batch 64
  .venv/bin/python bench/sample_throughput.py --samplers ddpm ddim:50 ddim:100 --batch-size 256
"""

from __future__ import annotations

import argparse
import sys
import time

from ddpm_core.parallel import configure_cpu_devices

configure_cpu_devices()

import common  # noqa: E402  bench/common.py
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from ddpm_core.config import make_config  # noqa: E402
from ddpm_core.generate import SAMPLERS, generate  # noqa: E402
from ddpm_core.parallel import batch_sharded, make_mesh, put_replicated  # noqa: E402
from ddpm_core.unet import ModelApply, create_model  # noqa: E402
from flows.cli import parse_override  # noqa: E402


def parse_sampler(text: str) -> tuple[str, int]:
    """``NAME`` or ``NAME:STEPS``; 0 steps means the sampler's default."""
    name, _, steps = text.partition(":")
    if name not in SAMPLERS:
        raise argparse.ArgumentTypeError(f"unknown sampler {name!r}; choose one of {SAMPLERS}")
    try:
        return name, int(steps or 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"steps must be an integer in {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", help="configuration preset of the model (default: cpu)")
    parser.add_argument("--set", dest="overrides", action="append", type=parse_override, default=[],
                        metavar="KEY=VALUE", help="configuration override, e.g. diffusion.num_timesteps=1000")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    parser.add_argument("--samplers", type=parse_sampler, nargs="+", default=None, metavar="NAME[:STEPS]",
                        help="samplers to time through generate (default: ddpm ddim:50)")
    parser.add_argument("--forward-repeats", type=int, default=20, help="timed forward calls (default: 20)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed generate calls per sampler after the compiling one (default: 1)")
    common.add_record_options(parser)
    args = parser.parse_args(argv)
    for name in ("batch_size", "forward_repeats", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    args.samplers = args.samplers or [("ddpm", 0), ("ddim", 50)]
    return args


def measure_forward(apply_fn, params, batch_size: int, repeats: int, peak_gflops: float) -> list:
    x = jax.random.normal(jax.random.PRNGKey(1), (batch_size, 28, 28, 1), jnp.float32)
    t = jnp.full((batch_size,), 10, jnp.int32)
    # Split over the local devices as generate does; XLA's cost analysis then counts one device.
    mesh = make_mesh(jax.local_devices())
    devices = 1
    if mesh.size > 1 and batch_size % mesh.size == 0:
        x, t = jax.device_put((x, t), batch_sharded(mesh))
        params = put_replicated(params, mesh)
        devices = mesh.size
    started = time.perf_counter()
    compiled = jax.jit(apply_fn).lower(params, x, t).compile()
    compile_s = time.perf_counter() - started
    compiled(params, x, t).block_until_ready()
    durations = common.time_calls(lambda: compiled(params, x, t).block_until_ready(), repeats)
    seconds = common.median(durations)
    flops = common.cost_flops(compiled) * devices
    dense_flops = common.matmul_conv_flops(jax.make_jaxpr(apply_fn)(params, x, t).jaxpr)
    gflops = flops / seconds / 1e9
    return [batch_size, 1e3 * seconds, batch_size / seconds, flops / batch_size / 1e6,
            dense_flops / batch_size / 1e6, gflops,
            f"{100 * gflops / peak_gflops:.1f} %", compile_s]


def measure_sampler(apply_fn, params, config, name: str, steps: int, batch_size: int, repeats: int,
                    forward_rate: float) -> list:
    def call():
        images, _ = generate(apply_fn, params, config, num_samples=batch_size, seed=0, sampler=name,
                             steps=steps, batch_size=batch_size)
        return images

    started = time.perf_counter()
    images = call()
    first_s = time.perf_counter() - started
    if not np.all(np.isfinite(images)):
        raise FloatingPointError(f"{name} produced non-finite images")
    seconds = common.median(common.time_calls(call, repeats))
    num_steps = steps or config.diffusion.num_timesteps
    step_rate = batch_size * num_steps / seconds
    return [f"{name}-{num_steps}", batch_size, first_s, seconds, batch_size / seconds, step_rate,
            f"{100 * step_rate / forward_rate:.0f} %"]


def main(argv=None) -> int:
    args = parse_args(argv)
    other_load = common.busy_processes()
    config = make_config(args.preset, dict(args.overrides))
    graphdef, params = nnx.split(create_model(config.model, config.train.seed))
    apply_fn = ModelApply(graphdef)
    peak_gflops = common.measure_matmul_peak()

    forward = measure_forward(apply_fn, params, args.batch_size, args.forward_repeats, peak_gflops)
    forward_table = common.format_table(
        ["batch", "ms per forward", "images/s per denoising step", "MFLOP/image (XLA)",
         "conv+matmul MFLOP/image", "GFLOP/s (XLA)",
         "share of matmul peak", "compile s"], [forward])
    print(forward_table, flush=True)

    sampler_rows = []
    for name, steps in args.samplers:
        sampler_rows.append(measure_sampler(apply_fn, params, config, name, steps, args.batch_size, args.repeats,
                                            forward[2]))
        print(sampler_rows[-1], flush=True)
    sampler_table = common.format_table(
        ["sampler-steps", "batch", "first call s (with compile)", "s per batch", "images/s",
         "image-steps/s", "of a lone forward's rate"], sampler_rows)

    body = (f"Preset `{args.preset}` (T = {config.diffusion.num_timesteps}), freshly initialised weights, "
            f"fp32 2048x2048 matmul peak in this process: {peak_gflops:.1f} GFLOP/s. Peak RSS "
            f"{common.peak_rss_mib():.0f} MiB.\n\nOne forward pass:\n\n{forward_table}\n\n"
            f"Whole batches through `ddpm_core.generate.generate` (median of {args.repeats} after the first call):"
            f"\n\n{sampler_table}")
    common.finish("Sampling throughput", body, args, common.describe_machine(other_load))
    return 0


if __name__ == "__main__":
    sys.exit(main())

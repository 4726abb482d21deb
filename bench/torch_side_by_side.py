"""JAX against PyTorch on the same CPU: training and forward throughput of U-Nets of similar FLOPs.

The JAX side is the project's compiled train step and forward pass. The PyTorch side is a
diffusers ``UNet2DModel`` laid out like the project's U-Net: the same channels per level, one
residual block per level on the way down and two on the way up, and attention at 7x7 and in the
middle. It trains with the same loss and the same optimiser steps: gradient-norm clipping, Adam,
and an EMA update.
Both run in this process, with their timed repeats interleaved so that other load hits both alike.
JAX runs as the pipeline does: the CPU split into one device per core unless ``DDPM_CPU_DEVICES``
sets another count, the preset's steps per dispatch, and the forward batch split over the devices.
FLOPs per image are counted the same way on both sides: 2 x multiply-adds of convolutions and
matrix products (JAX: from the jaxpr; PyTorch: ``torch.utils.flop_counter``).

Needs the optional group ``bench`` (``.venv/bin/pip install -e '.[bench]'``); without torch and
diffusers it prints why and exits with status 0.

Example:
  .venv/bin/python bench/torch_side_by_side.py --batch-size 64 --steps 30
"""

from __future__ import annotations

import argparse
import math
import sys

from ddpm_core.parallel import configure_cpu_devices

configure_cpu_devices()

import common  # noqa: E402  bench/common.py
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ddpm_core.config import make_config  # noqa: E402
from ddpm_core.parallel import batch_sharded, put_replicated  # noqa: E402
from ddpm_core.train import compile_train_chunk, create_trainer  # noqa: E402

DATASET_SIZE = 60_000


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", help="preset whose model and learning rate JAX uses (default: cpu)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default: the preset's)")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per repeat (default: 30)")
    parser.add_argument("--forward-calls", type=int, default=20, help="timed forward calls per repeat (default: 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps and calls first (default: 5)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians are reported (default: 3)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="PyTorch intra-op threads (default: PyTorch's choice, one per core)")
    common.add_record_options(parser)
    args = parser.parse_args(argv)
    for name in ("steps", "forward_calls", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0 or (args.batch_size is not None and args.batch_size < 1):
        parser.error("--warmup must be at least 0 and --batch-size at least 1")
    return args


def build_torch_model(config, torch, diffusers):
    """Build a diffusers UNet2DModel with the project's U-Net layout and the channels of ``config.model``."""
    model = config.model
    channels = tuple(model.base_channels * mult for mult in model.channel_mults)
    sides = model.resolutions()
    down = tuple("AttnDownBlock2D" if side in model.attention_resolutions else "DownBlock2D" for side in sides)
    up = tuple("AttnUpBlock2D" if side in model.attention_resolutions else "UpBlock2D" for side in reversed(sides))
    return diffusers.UNet2DModel(
        sample_size=28, in_channels=1, out_channels=1, block_out_channels=channels,
        layers_per_block=model.num_res_blocks, down_block_types=down, up_block_types=up,
        norm_num_groups=model.num_groups, attention_head_dim=channels[-1] // model.num_heads,
        dropout=model.dropout,
    )


class TorchTrainer:
    """PyTorch trainer with the steps of ddpm_core.train: batch draw, eps loss, clipping, Adam, EMA."""

    def __init__(self, config, images: np.ndarray, torch, diffusers):
        self.torch = torch
        self.config = config
        self.model = build_torch_model(config, torch, diffusers)
        self.ema = [parameter.detach().clone() for parameter in self.model.parameters()]
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.train.learning_rate)
        self.images = torch.from_numpy(images)
        betas = np.linspace(1e-4, 0.02, config.diffusion.num_timesteps) * 1000 / config.diffusion.num_timesteps
        alphas_cumprod = torch.from_numpy(np.cumprod(1.0 - betas)).float()
        self.sqrt_ab = alphas_cumprod.sqrt()
        self.sqrt_one_minus_ab = (1.0 - alphas_cumprod).sqrt()
        self.generator = torch.Generator().manual_seed(0)

    def step(self, batch_size: int) -> float:
        torch = self.torch
        index = torch.randint(0, self.images.shape[0], (batch_size,), generator=self.generator)
        x_start = self.images[index].permute(0, 3, 1, 2).float() / 127.5 - 1.0
        t = torch.randint(0, self.config.diffusion.num_timesteps, (batch_size,), generator=self.generator)
        noise = torch.randn(x_start.shape, generator=self.generator)
        x_t = self.sqrt_ab[t].view(-1, 1, 1, 1) * x_start + self.sqrt_one_minus_ab[t].view(-1, 1, 1, 1) * noise
        loss = torch.nn.functional.mse_loss(self.model(x_t, t).sample, noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.train.grad_clip_norm)
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, list(self.model.parameters()), 1.0 - self.config.train.ema_decay)
        return float(loss.detach())

    def forward_flops(self, batch_size: int) -> float:
        from torch.utils.flop_counter import FlopCounterMode

        x = self.torch.randn(batch_size, 1, 28, 28)
        t = self.torch.full((batch_size,), 10)
        with self.torch.no_grad(), FlopCounterMode(display=False) as counter:
            self.model(x, t)
        return counter.get_total_flops() / batch_size


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import diffusers
        import torch
    except ImportError as error:
        print(f"Skipped: {error}. Install the optional group with: .venv/bin/pip install -e '.[bench]'")
        return 0

    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    other_load = common.busy_processes()
    config = make_config(args.preset, {} if args.batch_size is None else {"train.batch_size": args.batch_size})
    batch = config.train.batch_size
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (DATASET_SIZE, 28, 28, 1), dtype=np.uint8)
    labels = np.zeros(DATASET_SIZE, np.int32)

    # JAX: the project's compiled step and forward.
    trainer, state = create_trainer(config)
    images_jax = put_replicated(images, trainer.mesh)
    labels_jax = put_replicated(labels, trainer.mesh)
    jax_step = compile_train_chunk(trainer).lower(state, images_jax, labels_jax).compile()
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, 28, 28, 1), jnp.float32)
    t = jnp.full((batch,), 10, jnp.int32)
    if batch % trainer.mesh.size == 0:
        x, t = jax.device_put((x, t), batch_sharded(trainer.mesh))
    dispatches = math.ceil(args.steps / config.train.steps_per_dispatch)
    jax_steps = dispatches * config.train.steps_per_dispatch
    jax_forward = jax.jit(trainer.apply).lower(state.ema_params, x, t).compile()
    jax_flops = common.matmul_conv_flops(jax.make_jaxpr(trainer.apply)(state.ema_params, x, t).jaxpr) / batch
    jax_params = sum(leaf.size for leaf in jax.tree.leaves(state.params))

    # PyTorch: the diffusers model with the same layout.
    torch.manual_seed(0)
    torch_trainer = TorchTrainer(config, images, torch, diffusers)
    torch_flops = torch_trainer.forward_flops(batch)
    torch_params = sum(parameter.numel() for parameter in torch_trainer.model.parameters())
    torch_x = torch.randn(batch, 1, 28, 28)
    torch_t = torch.full((batch,), 10)

    def jax_train():
        nonlocal state
        for _ in range(dispatches):
            state, _ = jax_step(state, images_jax, labels_jax)
        jax.block_until_ready(state)

    def torch_train():
        torch_trainer.model.train()
        for _ in range(args.steps):
            torch_trainer.step(batch)

    def jax_infer():
        for _ in range(args.forward_calls):
            output = jax_forward(state.ema_params, x, t)
        output.block_until_ready()

    def torch_infer():
        torch_trainer.model.eval()
        with torch.inference_mode():
            for _ in range(args.forward_calls):
                torch_trainer.model(torch_x, torch_t)

    for _ in range(args.warmup):
        torch_trainer.step(batch)
    for _ in range(math.ceil(args.warmup / config.train.steps_per_dispatch)):
        state, _ = jax_step(state, images_jax, labels_jax)
    jax_infer()
    torch_infer()

    timings = {name: [] for name in ("jax_train", "torch_train", "jax_forward", "torch_forward")}
    for _ in range(args.repeats):
        timings["jax_train"] += common.time_calls(jax_train, 1)
        timings["torch_train"] += common.time_calls(torch_train, 1)
        timings["jax_forward"] += common.time_calls(jax_infer, 1)
        timings["torch_forward"] += common.time_calls(torch_infer, 1)
    train_rate = {"jax": jax_steps * batch / common.median(timings["jax_train"]),
                  "torch": args.steps * batch / common.median(timings["torch_train"])}
    forward_rate = {side: args.forward_calls * batch / common.median(timings[f"{side}_forward"])
                    for side in ("jax", "torch")}

    rows = [
        ["JAX + Flax NNX (project U-Net)", jax_params, jax_flops / 1e6, train_rate["jax"], forward_rate["jax"]],
        ["PyTorch + diffusers UNet2DModel", torch_params, torch_flops / 1e6, train_rate["torch"],
         forward_rate["torch"]],
        ["JAX / PyTorch", f"{jax_params / torch_params:.2f}", f"{jax_flops / torch_flops:.2f}",
         f"{train_rate['jax'] / train_rate['torch']:.2f}", f"{forward_rate['jax'] / forward_rate['torch']:.2f}"],
    ]
    table = common.format_table(["side", "parameters", "forward MFLOP/image", "train images/s",
                                 "forward images/s"], rows)
    body = (f"Preset `{args.preset}` model, batch {batch}, {args.steps} training steps ({jax_steps} on the JAX "
            f"side, {config.train.steps_per_dispatch} per dispatch, on {jax.device_count()} device(s)) and "
            f"{args.forward_calls} forward calls per repeat, medians of {args.repeats} interleaved repeats after {args.warmup} warm-up "
            f"steps. torch {torch.__version__} with {torch.get_num_threads()} threads, diffusers "
            f"{diffusers.__version__}.\n\n{table}")
    common.finish("JAX and PyTorch side by side", body, args, common.describe_machine(other_load))
    return 0


if __name__ == "__main__":
    sys.exit(main())

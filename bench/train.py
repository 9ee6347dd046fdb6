"""Fine-tuning throughput: training samples/s of one worker, FLOP per sample, achieved TFLOP/s and MFU.

A script that prints figures, not a test. It times the IP2P-family training step of
:mod:`u2s.finetune` on precomputed inputs (``precompute: true``: VAE latents and text embeddings are
given, so the step is the denoiser's): the 8-channel UNet's forward on a noised latent ‖ source latent
under a text context, the MSE loss, backward and AdamW, at ``--resolution`` (latents at 1/8) and
``--batch`` samples a step. UNets are random-weight architectures built from configs (nothing is
downloaded):

* ``tiny``: the test suite's tiny IP2P UNet (channels 32, 64; context width 32);
* ``mid``: a mid-size UNet (channels 128, 256, 512; context 512);
* ``sd15``: the SD1.5 UNet of InstructPix2Pix / SafeAttention (channels 320..1280; context 768).

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` over one forward and one forward +
backward step (the ratio checks the "≈ 3× forward" that ``u2s plan --finetune`` assumes). CPU (default):
``--threads`` torch threads, as one Ray Train worker with ``cpus_per_worker`` of that many::

    python bench/train.py                              # tiny and mid, 1 thread
    python bench/train.py --unets mid --threads 2 --json train-cpu.json

GPU (``--gpu``): the SD1.5 UNet at 256 px in bf16 autocast, batch 64 (the paper's), and the achieved
TFLOP/s over the card's peak dense bf16 rate (``u2s.plan.CARDS``) as MFU::

    python bench/train.py --gpu                        # on a CUDA machine
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import check_gpu_environment, fmt, machine_info, markdown_table, write_json

#: UNet sizes: block channels, attention heads, layers per block, text context width.
UNETS: dict[str, dict[str, Any]] = {
    "tiny": {"channels": (32, 64), "heads": 8, "layers": 2, "context": 32, "groups": 32},
    "mid": {"channels": (128, 256, 512), "heads": 8, "layers": 2, "context": 512, "groups": 32},
    "sd15": {"channels": (320, 640, 1280, 1280), "heads": 8, "layers": 2, "context": 768, "groups": 32},
}


@dataclass
class Figure:
    """One measured configuration."""

    unet: str
    params_m: float
    device: str
    threads: int | None
    resolution: int
    batch: int
    steps: int
    seconds_per_step: float
    samples_per_s: float
    tflop_forward: float  # per sample
    tflop_train: float  # per sample: forward + backward
    achieved_tflops: float
    mfu: float | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def build_unet(name: str) -> Any:
    from diffusers import UNet2DConditionModel

    spec = UNETS[name]
    channels = spec["channels"]
    down = ("CrossAttnDownBlock2D",) * (len(channels) - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(channels) - 1)
    return UNet2DConditionModel(
        sample_size=32, in_channels=8, out_channels=4, block_out_channels=channels,
        layers_per_block=spec["layers"], attention_head_dim=spec["heads"],
        cross_attention_dim=spec["context"], down_block_types=down, up_block_types=up,
        norm_num_groups=spec["groups"],
    )  # fmt: skip


def inputs(name: str, batch: int, resolution: int, device: str) -> tuple[Any, Any, Any, Any]:
    """Random (noisy ‖ source latent, timesteps, context, target) of one micro-batch."""
    import torch

    side = resolution // 8
    latents = torch.randn(batch, 8, side, side, device=device)
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    context = torch.randn(batch, 77, UNETS[name]["context"], device=device)
    return latents, timesteps, context, torch.randn(batch, 4, side, side, device=device)


def count_flops(unet: Any, batch: tuple[Any, ...], autocast: Any) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs of one micro-batch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    latents, timesteps, context, target = batch
    with FlopCounterMode(display=False) as forward, torch.no_grad(), autocast():
        unet(latents, timesteps, context, return_dict=False)
    with FlopCounterMode(display=False) as train:
        with autocast():
            prediction = unet(latents, timesteps, context, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(prediction.float(), target.float())
        loss.backward()
    unet.zero_grad(set_to_none=True)
    return float(forward.get_total_flops()), float(train.get_total_flops())


def peak_tflops(device_name: str) -> float | None:
    from u2s.plan import CARDS, same_card

    return next((card.peak_tflops for card in CARDS.values() if same_card(device_name, card)), None)


def measure(name: str, args: argparse.Namespace) -> Figure:
    import contextlib

    import torch

    device = "cuda" if args.gpu else "cpu"
    torch.manual_seed(0)
    unet = build_unet(name).to(device).train()
    if args.gpu and args.checkpointing:
        unet.enable_gradient_checkpointing()

    def autocast() -> Any:
        if not args.gpu:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16)

    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    batch = inputs(name, args.batch, args.resolution, device)
    forward, train = count_flops(unet, batch, autocast)

    def step() -> None:
        latents, timesteps, context, target = batch
        with autocast():
            prediction = unet(latents, timesteps, context, return_dict=False)[0]
        torch.nn.functional.mse_loss(prediction.float(), target.float()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if args.gpu:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    if args.gpu:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / args.steps
    achieved = train / seconds / 1e12
    peak = peak_tflops(torch.cuda.get_device_name()) if args.gpu else None
    return Figure(
        unet=name, params_m=sum(p.numel() for p in unet.parameters()) / 1e6, device=device,
        threads=None if args.gpu else args.threads, resolution=args.resolution, batch=args.batch,
        steps=args.steps, seconds_per_step=seconds, samples_per_s=args.batch / seconds,
        tflop_forward=forward / args.batch / 1e12, tflop_train=train / args.batch / 1e12,
        achieved_tflops=achieved, mfu=achieved / peak if peak else None,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unets", default=None, help="Comma-separated: tiny, mid, sd15 (default: tiny,mid; "
                        "--gpu: sd15).")  # fmt: skip
    parser.add_argument(
        "--gpu", action="store_true", help="CUDA, bf16 autocast, MFU against the card's peak."
    )
    parser.add_argument("--resolution", type=int, default=None, help="Training side (default 64; --gpu 256).")
    parser.add_argument("--batch", type=int, default=None, help="Samples a step (default 4; --gpu 64).")
    parser.add_argument("--steps", type=int, default=5, help="Timed steps.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps first.")
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch threads (one worker's CPUs).")
    parser.add_argument("--checkpointing", action="store_true", help="--gpu: UNet gradient checkpointing.")
    parser.add_argument("--json", help="Write the figures here.")
    args = parser.parse_args(argv)
    if args.gpu:
        check_gpu_environment(False, ("diffusers",))
    import torch

    if not args.gpu:
        torch.set_num_threads(args.threads)
    args.resolution = args.resolution or (256 if args.gpu else 64)
    args.batch = args.batch or (64 if args.gpu else 4)
    names = (args.unets or ("sd15" if args.gpu else "tiny,mid")).split(",")
    info = machine_info(("torch", "diffusers"))
    if args.gpu:
        info["gpu"] = torch.cuda.get_device_name()
    figures = [measure(name, args) for name in names]
    print(f"bench/train.py: {info}")
    headers = ["UNet", "params (M)", "device", "px", "batch", "s/step", "samples/s", "TFLOP/sample fwd",
               "fwd+bwd", "ratio", "TFLOP/s", "MFU"]  # fmt: skip
    cells = [
        [f.unet, fmt(f.params_m, ".1f"), f.device + (f" ({f.threads} thr)" if f.threads else ""),
         str(f.resolution), str(f.batch), fmt(f.seconds_per_step, ".3f"), fmt(f.samples_per_s, ".2f"),
         fmt(f.tflop_forward, ".3g"), fmt(f.tflop_train, ".3g"), fmt(f.tflop_train / f.tflop_forward, ".2f"),
         fmt(f.achieved_tflops, ".3g"), fmt(f.mfu, ".1%")]
        for f in figures
    ]  # fmt: skip
    print(markdown_table(headers, cells))
    if args.json:
        write_json(args.json, "gpu" if args.gpu else "cpu", info, "figures", figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())

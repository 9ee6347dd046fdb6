"""Throughput of the stage-2 editors: images/s, seconds/image, peak memory, batched vs one image a call.

A script that prints figures, not a test. Two modes:

CPU (default): builds the tiny random models of ``u2s.testing.tiny_models`` (or reads them from
``--models DIR``, as written by ``u2s tiny-models DIR``), then for each editor of the registry loads it
through ``load_editor(Stage2Config(...))`` as the stage-2 runner does, warms it up once and times
``edit`` over ``--images`` images (64×64 working size, ``--steps`` denoising steps) at the configured
batch size. Diffusion editors are also timed one image per call (the naive loop), and the speed-up of
batching is printed. Figures are those of tiny models: they measure the editors' own overhead and the
benefit of batching, not the cost of real models::

    python bench/stage2.py
    python bench/stage2.py --editors instruct_pix2pix,blur --images 8 --steps 4 --json cpu.json

GPU (``--gpu``): builds REAL-SIZE architectures with random weights (nothing is downloaded), saves them
and loads them back through ``load_editor`` in fp16 on CUDA (SDPA attention, diffusers' default):

* ``instruct_pix2pix`` and ``safe_attention``: the SD1.5 UNet with 8 input channels, the SD VAE and the
  CLIP ViT-L/14 text encoder; 100 steps, CFG text 7.5 / image 1.5 (PAPER.md §3.3);
* ``flowedit_sd3``: SD3-medium's transformer (24 layers, 2.0B parameters), its 16-channel VAE, CLIP-L and
  OpenCLIP bigG text encoders with projection, and a T5 encoder of T5-XXL's width with fewer layers
  (``--t5-layers``, default 4 of 24; it only encodes the prompts, once per batch); 50 steps, n_max 33,
  CFG 3.5 / 13.5 (PAPER.md §3.1).

At 512×512 it times batch sizes 1, 4 and 8 (batch 1 is the naive loop; it stops at the first OOM and
reports it), and reports peak CUDA memory (``torch.cuda.max_memory_allocated``) and model FLOP
utilisation: the denoiser's FLOPs of one step, counted with ``torch.utils.flop_counter.FlopCounterMode``,
times the steps, over the measured time and the card's peak dense bf16/fp16 rate (VAE and text encoders
are left out of the count, so the MFU is the denoiser's). ``--gpu --dry-run`` runs the same path on the
CPU with down-scaled architectures (and counts the real-size denoisers' FLOPs on the meta device), to
check the code where there is no GPU::

    python bench/stage2.py --gpu                      # on a CUDA machine
    python bench/stage2.py --gpu --batch-sizes 1,4 --json gpu.json
    python bench/stage2.py --gpu --dry-run            # anywhere

On a machine without diffusers or pydantic, carry them as wheels: docs/benchmarks.md says how.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import resource
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/stage2.py` from a checkout, u2s installed or not
    sys.path.insert(0, str(REPO))

from _common import (  # noqa: E402  (bench/ is on sys.path when run as a script)
    check_gpu_environment,
    cpu_name,
    fmt,
    free_memory,
    machine_info,
    markdown_table,
    write_json,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is local: never reach the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from u2s.config import ModelConfig, Stage2Config
    from u2s.stage2.editors.base import Editor, EditPrompt

#: Tiny-model folder (a key of ``u2s.testing.tiny_models.TINY_MODELS``) of each diffusion editor.
TINY_MODEL_OF = {
    "instruct_pix2pix": "instruct_pix2pix",
    "safe_attention": "instruct_pix2pix",
    "flowedit_sd3": "sd3",
    "flux_kontext": "flux_kontext",
}
#: Editors the GPU mode builds at real size (FLUX Kontext is left out: 12B random weights to save).
GPU_EDITORS = ("instruct_pix2pix", "safe_attention", "flowedit_sd3")
#: Peak dense bf16 (= fp16) tensor-core FLOP/s, by device-name substrings (first match wins).
PEAK_FLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H200",), 989e12),
    (("H100", "PCIE"), 756e12),
    (("H100",), 989e12),  # SXM (reported as "H100 80GB HBM3")
    (("A100",), 312e12),
)
MIB = 2**20


# --------------------------------------------------------------------------------------------------
# Result rows and printing
# --------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One timed configuration: an editor at one batch size over ``images`` images."""

    editor: str
    batch_size: int
    images: int
    seconds: float
    peak_mem_mib: float  # CPU: peak RSS of the process; GPU: torch.cuda.max_memory_allocated
    naive: bool = False  # the one-image-a-call loop
    speedup: float | None = None  # images/s over the naive loop's
    load_s: float | None = None  # load_editor, CPU mode
    tflop_per_image: float | None = None  # denoiser FLOPs, GPU mode
    mfu: float | None = None  # denoiser FLOP/s over the card's peak, GPU mode
    status: str = "ok"  # GPU mode: "OOM" or "error: <type>" (the figures are then empty)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else math.nan

    @property
    def s_per_image(self) -> float:
        return self.seconds / self.images if self.images else math.nan

    def to_json(self) -> dict[str, Any]:
        """The fields and the derived rates; NaN (no figure) becomes null."""
        data = {**asdict(self), "images_per_s": self.images_per_s, "s_per_image": self.s_per_image}
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in data.items()}


def cpu_table(rows: list[Row]) -> str:
    headers = ["editor", "batch", "images", "images/s", "s/image", "speed-up", "peak RSS MiB", "load s"]
    cells = [
        [
            r.editor + (" (naive loop)" if r.naive else ""),
            str(r.batch_size),
            str(r.images),
            fmt(r.images_per_s, ".2f"),
            fmt(r.s_per_image, ".4f"),
            fmt(r.speedup, ".2f") + ("x" if r.speedup else ""),
            fmt(r.peak_mem_mib, ".0f"),
            fmt(r.load_s, ".1f"),
        ]
        for r in rows
    ]
    return markdown_table(headers, cells)


def gpu_table(rows: list[Row], cuda: bool = True) -> str:
    memory = "peak CUDA MiB" if cuda else "peak RSS MiB"
    headers = ["editor", "batch", "images", "images/s", "s/image", "speed-up", memory]
    headers += ["TFLOP/image", "MFU", "status"]
    cells = []
    for r in rows:
        ok = r.status == "ok"
        cells.append(
            [
                r.editor + (" (naive loop)" if r.naive else ""),
                str(r.batch_size) if r.batch_size else "-",
                str(r.images) if ok else "-",
                fmt(r.images_per_s if ok else None, ".3f"),
                fmt(r.s_per_image if ok else None, ".3f"),
                fmt(r.speedup, ".2f") + ("x" if r.speedup else ""),
                fmt(r.peak_mem_mib if ok else None, ".0f"),
                fmt(r.tflop_per_image, ".4g"),
                fmt(None if r.mfu is None else 100 * r.mfu, ".1f") + ("%" if r.mfu is not None else ""),
                r.status,
            ]
        )
    return markdown_table(headers, cells)


# --------------------------------------------------------------------------------------------------
# Inputs, timing, memory
# --------------------------------------------------------------------------------------------------


def make_inputs(n: int, size: int, seed: int = 0) -> tuple[list[Image.Image], list[EditPrompt], list[int]]:
    """``n`` smooth random RGB images of ``size``², one prompt set each (non-private texts), seeds."""
    import numpy as np
    from PIL import Image

    from u2s.stage2.editors.base import EditPrompt

    rng = np.random.default_rng(seed)
    images = [
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(
            (size, size), Image.Resampling.BICUBIC
        )
        for _ in range(n)
    ]
    prompts = [
        EditPrompt(
            edit_instruction=f"replace the name on the shop sign with the word OPEN ({i})",
            public_caption="a street corner with a shop and a sign above the door",
            private_caption="a street corner with a shop and a sign reading JANE DOE above the door",
            combined_caption="a street corner with a shop and a sign reading OPEN above the door",
        )
        for i in range(n)
    ]
    return images, prompts, [1000 + i for i in range(n)]


def time_edit(
    editor: Editor,
    images: list[Image.Image],
    prompts: list[EditPrompt],
    seeds: list[int],
    batch_size: int,
    sync: Callable[[], None] = lambda: None,
    repeat: int = 1,
) -> float:
    """Seconds to edit every image, ``batch_size`` images per ``edit`` call; the fastest of ``repeat``."""
    best = math.inf
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        for i in range(0, len(images), batch_size):
            batch = slice(i, i + batch_size)
            editor.edit(images[batch], prompts[batch], seeds[batch])
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def reset_peak_rss() -> None:
    """Reset the process's peak RSS (Linux: ``/proc/self/clear_refs``); a no-op where unsupported."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mib() -> float:
    """Peak RSS since the last :func:`reset_peak_rss` (VmHWM), else since the process started."""
    try:
        match = re.search(r"VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
        if match:
            return int(match.group(1)) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


# --------------------------------------------------------------------------------------------------
# CPU mode: tiny models, every editor
# --------------------------------------------------------------------------------------------------


def build_tiny_models(root: Path, keys: set[str]) -> None:
    """Build the tiny models ``keys`` (``TINY_MODELS`` names) under ``root/<key>``."""
    from u2s.testing import tiny_models

    for key in sorted(keys):
        builder = getattr(tiny_models, tiny_models.TINY_MODELS[key])
        builder(root / key, seed=tiny_models.DEFAULT_SEEDS[key])


def is_diffusion(editor: str) -> bool:
    """Whether the editor loads a diffusers pipeline (its config has a ``model``)."""
    from u2s.stage2.editors import EDITORS

    return "model" in EDITORS[editor].config_class.model_fields


def editor_section(editor: str, model: ModelConfig | None, steps: int | None, size: int) -> dict[str, Any]:
    """The section ``stage2.<editor>``: its model, ``steps`` (if set) and working size ``size``."""
    from u2s.stage2.editors import EDITORS

    fields = EDITORS[editor].config_class.model_fields
    section: dict[str, Any] = {"model": model} if model is not None else {}
    if steps is not None and "num_inference_steps" in fields:
        section["num_inference_steps"] = steps
    if "resolution" in fields:  # the IP2P family and Kontext: the bench's images are already at it
        section["resolution"] = size
    return section


def cpu_config(editor: str, models: Path, args: argparse.Namespace) -> Stage2Config:
    """The job's stage-2 section for one editor on the tiny models (as in the cpu-tiny preset)."""
    from u2s.config import ModelConfig, Resources, Stage2Config

    defaults = Resources()
    model = None
    if is_diffusion(editor):
        model = ModelConfig(model=str(models / TINY_MODEL_OF[editor]), dtype="float32", device="cpu")
    return Stage2Config(
        editor=editor,
        **{editor: editor_section(editor, model, args.steps, args.size)},
        resources=Resources(
            batch_size=args.batch_size or defaults.batch_size,
            num_cpus=args.threads or defaults.num_cpus,
            torch_threads=args.threads,
        ),
    )


def bench_cpu_editor(name: str, cfg: Stage2Config, n_images: int, size: int, repeat: int = 1) -> list[Row]:
    """Load one editor, warm it up, time it batched (and one image a call for diffusion editors)."""
    from u2s.stage2.editors import load_editor
    from u2s.torch_utils import set_threads

    set_threads(cfg.resources.threads())  # what the runner's actor does before load_editor
    images, prompts, seeds = make_inputs(n_images, size)
    batch = min(cfg.resources.batch_size, n_images)
    free_memory()
    reset_peak_rss()
    start = time.perf_counter()
    editor = load_editor(cfg)
    load_s = time.perf_counter() - start
    editor.edit(images[:batch], prompts[:batch], seeds[:batch])  # warm-up
    seconds = time_edit(editor, images, prompts, seeds, batch, repeat=repeat)
    row = Row(name, batch, n_images, seconds, 0.0, load_s=load_s)
    rows = [row]
    if is_diffusion(name) and batch > 1:
        editor.edit(images[:1], prompts[:1], seeds[:1])  # warm-up of the batch-1 shapes
        seconds = time_edit(editor, images, prompts, seeds, 1, repeat=repeat)
        naive = Row(name, 1, n_images, seconds, 0.0, naive=True)
        row.speedup = naive.seconds / row.seconds
        rows.append(naive)
    for r in rows:
        r.peak_mem_mib = peak_rss_mib()
    del editor
    free_memory()
    return rows


def run_cpu(args: argparse.Namespace, editors: list[str]) -> tuple[list[Row], dict[str, Any]]:
    import torch

    from u2s.config import Resources

    info = machine_info(("torch", "diffusers")) | {
        "images": args.images,
        "size": args.size,
        "steps": args.steps,
        "repeat": args.repeat,
        "threads": args.threads or Resources().threads(),
    }
    print(
        f"CPU mode: {info['cpu']} ({info['cores']} cores, {info['threads']} torch threads), torch "
        f"{torch.__version__}, diffusers {info['diffusers']}, load average {info['load_average']}"
    )
    print(
        f"{args.images} images of {args.size}x{args.size}, {args.steps} steps, tiny random models, "
        f"fastest of {args.repeat} timing(s)\n"
    )
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="u2s-bench-") as tmp:
        models = Path(args.models) if args.models else Path(tmp)
        needed = {TINY_MODEL_OF[e] for e in editors if e in TINY_MODEL_OF}
        if not args.models:
            start = time.perf_counter()
            build_tiny_models(models, needed)
            print(f"built tiny models {sorted(needed)} in {time.perf_counter() - start:.1f}s")
        for name in editors:
            cfg = cpu_config(name, models, args)
            new = bench_cpu_editor(name, cfg, args.images, args.size, args.repeat)
            print(f"  {name}: {new[0].images_per_s:.2f} images/s at batch {new[0].batch_size}", flush=True)
            rows += new
    return rows, info


# --------------------------------------------------------------------------------------------------
# GPU mode: real-size architectures with random weights
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipSize:
    hidden: int
    ff: int
    layers: int
    heads: int
    act: str


@dataclass(frozen=True)
class T5Size:
    d_model: int
    ff: int
    layers: int
    heads: int
    d_kv: int


@dataclass(frozen=True)
class ArchSpec:
    """Sizes of the random-weight architectures: the published models' (REAL) or a CPU-sized copy (DRY)."""

    label: str
    unet_channels: tuple[int, ...]
    unet_heads: int  # diffusers' `attention_head_dim` of SD1.x, which is in fact the number of heads
    unet_layers: int
    vae_channels: tuple[int, ...]
    vae_layers: int
    clip_l: ClipSize  # IP2P's text encoder and SD3's first
    clip_g: ClipSize  # SD3's second (OpenCLIP bigG)
    t5: T5Size
    sd3_layers: int
    sd3_head_dim: int
    sd3_heads: int
    clip_vocab: int = 49408
    t5_vocab: int = 32128


REAL = ArchSpec(
    label="real size",
    unet_channels=(320, 640, 1280, 1280), unet_heads=8, unet_layers=2,
    vae_channels=(128, 256, 512, 512), vae_layers=2,
    clip_l=ClipSize(hidden=768, ff=3072, layers=12, heads=12, act="quick_gelu"),
    clip_g=ClipSize(hidden=1280, ff=5120, layers=32, heads=20, act="gelu"),
    t5=T5Size(d_model=4096, ff=10240, layers=24, heads=64, d_kv=64),
    sd3_layers=24, sd3_head_dim=64, sd3_heads=24,
)  # fmt: skip

DRY = ArchSpec(
    label="down-scaled (dry run)",
    unet_channels=(32, 32, 64, 64), unet_heads=4, unet_layers=1,
    vae_channels=(32, 32, 32, 32), vae_layers=1,
    clip_l=ClipSize(hidden=32, ff=37, layers=2, heads=4, act="quick_gelu"),
    clip_g=ClipSize(hidden=32, ff=37, layers=2, heads=4, act="gelu"),
    t5=T5Size(d_model=64, ff=37, layers=2, heads=4, d_kv=16),
    sd3_layers=2, sd3_head_dim=16, sd3_heads=2,
)  # fmt: skip


def _clip_config(tok: Any, size: ClipSize, vocab: int, projection: bool) -> Any:
    from transformers import CLIPTextConfig

    ids = tok.convert_tokens_to_ids
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=size.hidden, intermediate_size=size.ff, num_hidden_layers=size.layers,
        num_attention_heads=size.heads, hidden_act=size.act, max_position_embeddings=77,
        projection_dim=size.hidden if projection else 512, bos_token_id=ids("<|startoftext|>"),
        eos_token_id=ids("<|endoftext|>"), pad_token_id=ids("<|endoftext|>"),
    )  # fmt: skip


def _vae(spec: ArchSpec, latent_channels: int, flow: bool) -> Any:
    """SD's VAE (4 latent channels) or SD3's (16, shifted, no quant convs), at ``spec``'s widths."""
    from diffusers import AutoencoderKL

    extra: dict[str, Any] = {"scaling_factor": 0.18215}
    if flow:
        extra = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
        extra |= {"use_quant_conv": False, "use_post_quant_conv": False}
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=spec.vae_channels,
        layers_per_block=spec.vae_layers, down_block_types=("DownEncoderBlock2D",) * len(spec.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(spec.vae_channels), norm_num_groups=32, sample_size=512,
        **extra,
    )  # fmt: skip


def _unet(spec: ArchSpec) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64, in_channels=8, out_channels=4, block_out_channels=spec.unet_channels,
        layers_per_block=spec.unet_layers, attention_head_dim=spec.unet_heads,
        cross_attention_dim=spec.clip_l.hidden,
    )  # fmt: skip


def _sd3_transformer(spec: ArchSpec) -> Any:
    """SD3-medium's `SD3Transformer2DModel` config at ``spec``'s sizes (widths tied to the encoders)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=spec.sd3_layers,
        attention_head_dim=spec.sd3_head_dim, num_attention_heads=spec.sd3_heads,
        joint_attention_dim=spec.t5.d_model, caption_projection_dim=spec.sd3_heads * spec.sd3_head_dim,
        pooled_projection_dim=spec.clip_l.hidden + spec.clip_g.hidden, pos_embed_max_size=192,
    )  # fmt: skip


def build_ip2p(out: Path, spec: ArchSpec, device: str, dtype: torch.dtype) -> None:
    """An InstructPix2Pix pipeline (SD1.5 UNet, 8 input channels) with random weights, saved to ``out``."""
    import torch
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline
    from transformers import CLIPTextModel

    from u2s.testing.tiny_models import clip_tokenizer

    torch.manual_seed(0)
    tok = clip_tokenizer()
    with torch.device(device):  # initialise on the device: seconds instead of minutes at real size
        unet, vae = _unet(spec), _vae(spec, 4, flow=False)
        text = CLIPTextModel(_clip_config(tok, spec.clip_l, spec.clip_vocab, projection=False))
    scheduler = EulerAncestralDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler, safety_checker=None,
        feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.to(dtype=dtype).save_pretrained(out)


def build_sd3(out: Path, spec: ArchSpec, device: str, dtype: torch.dtype) -> None:
    """A Stable Diffusion 3 (medium) pipeline with random weights, saved to ``out``."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from u2s.testing.tiny_models import clip_tokenizer, t5_tokenizer

    torch.manual_seed(0)
    tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    t5 = spec.t5
    with torch.device(device):
        transformer, vae = _sd3_transformer(spec), _vae(spec, 16, flow=True)
        clip_l = CLIPTextModelWithProjection(_clip_config(tok, spec.clip_l, spec.clip_vocab, projection=True))
        clip_g = CLIPTextModelWithProjection(_clip_config(tok, spec.clip_g, spec.clip_vocab, projection=True))
        t5_model = T5EncoderModel(
            T5Config(
                vocab_size=spec.t5_vocab, d_model=t5.d_model, d_kv=t5.d_kv, d_ff=t5.ff, num_layers=t5.layers,
                num_heads=t5.heads, feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0,
                eos_token_id=1,
            )
        )  # fmt: skip
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=clip_l, tokenizer=tok, text_encoder_2=clip_g, tokenizer_2=tok,
        text_encoder_3=t5_model, tokenizer_3=t5_tok,
    )  # fmt: skip
    pipe.to(dtype=dtype).save_pretrained(out)


def sd3_text_tokens() -> int:
    """Text tokens the SD3 transformer attends to in FlowEdit: CLIP's 77 + the editor's T5 sequence."""
    from u2s.stage2.editors.flowedit_sd3 import MAX_SEQUENCE_LENGTH

    return 77 + MAX_SEQUENCE_LENGTH


def denoiser_inputs(model: Any, rows: int, latent: int, context: int) -> dict[str, Any]:
    """Random inputs of one denoiser call (UNet or SD3 transformer) with ``rows`` batch rows."""
    import torch

    param = next(model.parameters())
    randn = lambda *shape: torch.randn(*shape, device=param.device, dtype=param.dtype)  # noqa: E731
    cfg = model.config
    timestep = torch.full((rows,), 500.0, device=param.device, dtype=param.dtype)
    if hasattr(cfg, "joint_attention_dim"):  # SD3
        return {
            "hidden_states": randn(rows, cfg.in_channels, latent, latent),
            "encoder_hidden_states": randn(rows, context, cfg.joint_attention_dim),
            "pooled_projections": randn(rows, cfg.pooled_projection_dim),
            "timestep": timestep,
            "return_dict": False,
        }
    return {
        "sample": randn(rows, cfg.in_channels, latent, latent),
        "timestep": timestep,
        "encoder_hidden_states": randn(rows, context, cfg.cross_attention_dim),
        "return_dict": False,
    }


def count_flops(model: Any, inputs: dict[str, Any]) -> int:
    """FLOPs of one forward call (a multiply-add counts 2), by ``FlopCounterMode``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(**inputs)
    return counter.get_total_flops()


def denoiser_flops_per_image(name: str, denoiser: Any, cfg: Stage2Config, latent: int) -> float:
    """Denoiser FLOPs to edit one image with ``cfg``: one step's calls counted, times the steps.

    IP2P (both editors): 3 CFG rows (text+image, image, none) a step, ``num_inference_steps`` steps;
    SafeAttention's context is 2×77 tokens. FlowEdit: 4 rows (source and target, each with and without
    its prompt) on each of the ``n_max - n_min`` editing steps (× ``n_avg``), 2 rows on the ``n_min``
    plain target steps.
    """
    fe = cfg.section()
    if name in ("instruct_pix2pix", "safe_attention"):
        context = 154 if name == "safe_attention" else 77
        return count_flops(denoiser, denoiser_inputs(denoiser, 3, latent, context)) * fe.num_inference_steps
    n_max = min(fe.n_max, fe.num_inference_steps)
    n_min = min(fe.n_min, n_max)
    flops = count_flops(denoiser, denoiser_inputs(denoiser, 4, latent, sd3_text_tokens())) * fe.n_avg
    total = flops * (n_max - n_min)
    if n_min:
        total += count_flops(denoiser, denoiser_inputs(denoiser, 2, latent, sd3_text_tokens())) * n_min
    return total


def peak_flops(device_name: str) -> float | None:
    """The card's peak dense bf16 FLOP/s from :data:`PEAK_FLOPS`, None if the card is not listed."""
    upper = device_name.upper()
    for keys, flops in PEAK_FLOPS:
        if all(k in upper for k in keys):
            return flops
    return None


def meta_flop_check(size: int) -> list[str]:
    """Real-size denoisers built on the meta device (no memory, no compute): parameters, FLOPs per step.

    Checks that the real configurations construct with the installed diffusers and gives the counts
    the GPU run will use, without a GPU.
    """
    import torch

    lines = []
    latent = size // 8
    with torch.device("meta"):
        unet, transformer = _unet(REAL), _sd3_transformer(REAL)
    for label, model, rows, context in (
        ("IP2P UNet (SD1.5, 8 in-channels)", unet, 3, 77),
        ("SD3-medium transformer", transformer, 4, sd3_text_tokens()),
    ):
        with torch.device("meta"):
            flops = count_flops(model, denoiser_inputs(model, rows, latent, context))
        params = sum(p.numel() for p in model.parameters()) / 1e9
        step = f"one step at {size}px, {rows} CFG rows: {flops / 1e12:.2f} TFLOP"
        lines.append(f"{label}: {params:.3f}B parameters; {step}")
    return lines


def gpu_config(name: str, model_dir: Path, dtype: str, device: str, size: int, steps: int | None) -> Any:
    """The stage-2 section for one editor at the paper's settings (its config class's defaults)."""
    from u2s.config import ModelConfig, Stage2Config

    model = ModelConfig(model=str(model_dir), dtype=dtype, device=device)
    return Stage2Config(editor=name, **{name: editor_section(name, model, steps, size)})


def component_sizes(pipe: Any) -> str:
    """'name 1.23B, ...' for the pipeline's torch modules."""
    import torch

    parts = [
        f"{name} {sum(p.numel() for p in module.parameters()) / 1e9:.3f}B"
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
    ]
    return ", ".join(parts)


def bench_gpu_editor(
    name: str, cfg: Stage2Config, args: argparse.Namespace, peak: float | None, cuda: bool
) -> list[Row]:
    """Load one editor, count its denoiser FLOPs, time it at each batch size (1 = the naive loop)."""
    import torch

    from u2s.stage2.editors import load_editor

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    start = time.perf_counter()
    editor = load_editor(cfg)
    pipe = editor.pipe  # every diffusion editor keeps its diffusers pipeline here
    print(f"  loaded in {time.perf_counter() - start:.1f}s: {component_sizes(pipe)}")
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    attn = sorted({type(p).__name__ for p in denoiser.attn_processors.values()})
    print(f"  attention processors: {', '.join(attn)}; dtype {denoiser.dtype}")
    latent = args.size // pipe.vae_scale_factor
    flops = denoiser_flops_per_image(name, denoiser, cfg, latent)
    print(f"  denoiser: {flops / 1e12:.4g} TFLOP per image ({cfg.section().num_inference_steps} steps)")
    n_images = args.images or max(args.batch_sizes)
    images, prompts, seeds = make_inputs(n_images, args.size)
    editor.edit(images[:1], prompts[:1], seeds[:1])  # warm-up
    rows: list[Row] = []
    naive_s: float | None = None
    for batch in args.batch_sizes:
        n = max(batch, n_images // batch * batch)
        imgs, prm, sds = make_inputs(n, args.size) if n > n_images else (images, prompts, seeds)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            seconds = time_edit(editor, imgs[:n], prm[:n], sds[:n], batch, sync, args.repeat)
        except torch.cuda.OutOfMemoryError:
            rows.append(Row(name, batch, n, math.nan, math.nan, status="OOM"))
            print(f"  batch {batch}: out of memory; larger batch sizes skipped", flush=True)
            free_memory()
            break
        mem = torch.cuda.max_memory_allocated() / MIB if cuda else peak_rss_mib()
        row = Row(name, batch, n, seconds, mem, naive=batch == 1, tflop_per_image=flops / 1e12)
        row.mfu = flops * n / seconds / peak if peak else None
        if batch == 1:
            naive_s = seconds / n
        elif naive_s is not None:
            row.speedup = naive_s / row.s_per_image
        rows.append(row)
        print(f"  batch {batch}: {row.images_per_s:.3f} images/s", flush=True)
    del editor, pipe, denoiser
    free_memory()
    return rows


def run_gpu(args: argparse.Namespace, editors: list[str]) -> tuple[list[Row], dict[str, Any]]:
    import torch

    cuda = not args.dry_run
    device = "cuda" if cuda else "cpu"
    if not cuda:
        torch.set_num_threads(args.threads or 1)  # as in CPU mode: one thread, the Stage2Config default
    dtype_name = args.dtype if cuda else "float32"
    dtype = getattr(torch, dtype_name)
    spec = REAL if cuda else DRY
    spec = replace(spec, t5=replace(spec.t5, layers=args.t5_layers)) if cuda else spec
    if 1 not in args.batch_sizes:
        args.batch_sizes = [1, *args.batch_sizes]  # the naive loop is always measured
    name = torch.cuda.get_device_name() if cuda else cpu_name()
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (peak_flops(name) if cuda else None)
    info = machine_info(("torch", "diffusers")) | {
        "device": name,
        "peak_flops": peak,
        "dtype": dtype_name,
        "size": args.size,
        "architectures": spec.label,
        "t5_layers": spec.t5.layers,
        "batch_sizes": args.batch_sizes,
        "repeat": args.repeat,
        "dry_run": args.dry_run,
    }
    mode = "GPU mode (dry run on CPU)" if args.dry_run else "GPU mode"
    print(
        f"{mode}: {name}, {dtype_name}, {args.size}x{args.size}, batch sizes {args.batch_sizes}, "
        f"torch {torch.__version__}, diffusers {info['diffusers']}"
    )
    print(f"peak dense bf16: {peak / 1e12:.0f} TFLOP/s" if peak else "peak FLOP/s unknown: MFU not computed")
    if cuda and spec.t5.layers < REAL.t5.layers:
        print(
            f"note: T5 sized down to {spec.t5.layers} of T5-XXL's 24 layers (full width {spec.t5.d_model}); "
            "it encodes the prompts once per batch, outside the denoising loop"
        )
    if args.dry_run:
        print("real-size denoisers on the meta device (FLOPs the GPU run counts):")
        for line in meta_flop_check(512):
            print(f"  {line}")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="u2s-bench-gpu-", dir=args.tmp) as tmp:
        built: dict[str, Path] = {}
        for editor in editors:
            family = "sd3" if editor == "flowedit_sd3" else "instruct_pix2pix"
            if family not in built:
                start = time.perf_counter()
                (build_sd3 if family == "sd3" else build_ip2p)(Path(tmp) / family, spec, device, dtype)
                built[family] = Path(tmp) / family
                free_memory()
                print(f"built {family} ({spec.label}) in {time.perf_counter() - start:.1f}s", flush=True)
            cfg = gpu_config(editor, built[family], dtype_name, device, args.size, args.steps)
            print(f"{editor}: {cfg.section().num_inference_steps} steps", flush=True)
            try:
                rows += bench_gpu_editor(editor, cfg, args, peak, cuda)
            except Exception as e:  # a device run is scarce: report the failure, go on with the rest
                traceback.print_exc()
                rows.append(Row(editor, 0, 0, math.nan, math.nan, status=f"error: {type(e).__name__}"))
                free_memory()
            if args.json:  # after each editor, so a run cut short still leaves its figures
                write_json(
                    args.json, "gpu", info, "rows", rows, quiet=True, stages=stage_figures(rows, info, args)
                )
    return rows, info


def stage_figures(rows: list[Row], info: dict[str, Any], args: argparse.Namespace) -> list[Any]:
    """Per-editor figures for `u2s plan --bench`: the best batch size of each editor, with its settings."""
    from u2s.plan import BenchStage
    from u2s.stage2.editors import EDITORS

    cuda = args.gpu and not args.dry_run
    card = info["device"] if cuda else f"{info['cpu']} (CPU{', GPU dry run' if args.gpu else ''})"
    figures = []
    for editor in dict.fromkeys(r.editor for r in rows):
        ok = [r for r in rows if r.editor == editor and r.status == "ok" and r.images_per_s > 0]
        if not ok:
            continue
        best = max(ok, key=lambda r: r.images_per_s)
        default = EDITORS[editor].config_class.model_fields.get("num_inference_steps")
        steps = args.steps or (default.default if default else None)
        settings = {"batch_size": best.batch_size, "size": args.size, "steps": steps,
                    "dtype": info.get("dtype", "float32"), "tiny_models": not args.gpu}  # fmt: skip
        figures.append(BenchStage(pool="edit", rows_per_s=best.images_per_s, gpus=1 if cuda else 0, card=card,
                                  editor=editor, script="bench/stage2.py", settings=settings))  # fmt: skip
    return figures


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="real-size architectures on CUDA")
    parser.add_argument("--dry-run", action="store_true", help="with --gpu: down-scaled, on the CPU")
    parser.add_argument("--editors", help="comma-separated editor names (default: all the mode supports)")
    parser.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    parser.add_argument("--images", type=int, help="images per timing (CPU 8; GPU: the largest batch)")
    parser.add_argument("--steps", type=int, help="denoising steps (CPU 4, dry run 2; GPU: the paper's)")
    parser.add_argument("--size", type=int, help="image side (CPU and dry run 64, GPU 512)")
    parser.add_argument("--repeat", type=int, default=1, help="timings per figure; the fastest is kept")
    parser.add_argument("--models", metavar="DIR", help="CPU: tiny models already built here")
    parser.add_argument("--batch-size", type=int, help="CPU: batch size (default: Stage2Config's)")
    parser.add_argument("--threads", type=int, help="torch threads (default: Stage2Config's, 1)")
    parser.add_argument("--batch-sizes", default="1,4,8", help="GPU: batch sizes to time (default 1,4,8)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"], help="GPU dtype")
    parser.add_argument("--t5-layers", type=int, default=4, help="GPU: T5 layers (T5-XXL has 24)")
    parser.add_argument("--peak-tflops", type=float, help="GPU: the card's peak dense TFLOP/s (override)")
    parser.add_argument("--tmp", help="GPU: folder for the saved random-weight models (default: $TMPDIR)")
    args = parser.parse_args(argv)
    if args.dry_run and not args.gpu:
        parser.error("--dry-run goes with --gpu")
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if not args.gpu:
        args.images, args.steps, args.size = args.images or 8, args.steps or 4, args.size or 64
    elif args.dry_run:
        args.steps, args.size = args.steps or 2, args.size or 64
        args.images = args.images or max(args.batch_sizes)
    else:
        args.size = args.size or 512
    return args


def select_editors(args: argparse.Namespace) -> list[str]:
    from u2s.stage2.editors import EDITORS

    available = list(GPU_EDITORS) if args.gpu else list(EDITORS)
    if not args.editors:
        return available
    chosen = [e.strip() for e in args.editors.split(",") if e.strip()]
    unknown = [e for e in chosen if e not in available]
    if unknown:
        choices = ", ".join(available)
        sys.exit(f"error: {', '.join(unknown)} not benchmarked in this mode; choose from {choices}")
    return chosen


def quiet_libraries() -> None:
    """No progress bars, and the model libraries' input-echoing warnings off (as in the editors)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from u2s.log_privacy import silence_input_echo

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    silence_input_echo()
    # Random fp16 weights can overflow to NaN; converting such outputs to pixels warns on every image.
    warnings.filterwarnings("ignore", "invalid value encountered in cast", RuntimeWarning)


#: Printed under the table: these figures are one edit; stage2.verify multiplies them per flagged row.
VERIFY_NOTE = (
    "note: with stage2.verify (on in the paper preset) a flagged row costs, per edit attempt, one edit at "
    "its ladder rung's figure plus one check (reinspect: one call-A inspection, bench/stage1.py's inspect "
    "rate; faces: two dlib passes on CPUs); attempts per row = 1 + f + f^2 + ... for a check failure rate "
    "f, up to max_attempts. u2s plan --verify-fail f prints the total."
)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.gpu:
        check_gpu_environment(args.dry_run, ("diffusers", "pydantic"))
    editors = select_editors(args)
    quiet_libraries()
    if args.gpu:
        rows, info = run_gpu(args, editors)
        table = gpu_table(rows, cuda=not args.dry_run)
    else:
        rows, info = run_cpu(args, editors)
        table = cpu_table(rows)
    print()
    print(table)
    print(VERIFY_NOTE)
    if args.json:
        stages = stage_figures(rows, info, args)
        write_json(args.json, "gpu" if args.gpu else "cpu", info, "rows", rows, stages=stages)


if __name__ == "__main__":
    main()

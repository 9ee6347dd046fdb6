"""Tiny, randomly initialised models of every family u2s loads, built offline from configs.

Nothing here is used by the pipeline itself: these builders write ordinary `save_pretrained` folders
that the production loaders then read back with `from_pretrained`, exactly as they read real weights.
Tokenizers are byte-level and built in memory, so no hub access is ever needed. Every model is under
10 MB and builds in about a second; weights depend only on ``seed``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Qwen-style special tokens; `<image>` is the LLaVA image placeholder.
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]

#: ChatML template (the Qwen2 family's) that renders `{"type": "image"}` parts as `<image>`.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY_MODELS = {
    "vlm": "build_tiny_vlm",
    "llm": "build_tiny_llm",
    "instruct_pix2pix": "build_tiny_instruct_pix2pix",
    "sd3": "build_tiny_sd3",
    "flux_kontext": "build_tiny_flux_kontext",
    "clip": "build_tiny_clip",
}

#: The file every builder writes into its folder: it marks the weights as random, so an evaluation of a
#: run on these models can say so (``{"u2s_tiny": true, "builder": ..., "seed": ...}``).
TINY_MARKER = "u2s-tiny-model.json"


def _marked(builder: Callable[..., Path]) -> Callable[..., Path]:
    """Write :data:`TINY_MARKER` into the folder ``builder`` saved."""

    @functools.wraps(builder)
    def build(out: str | Path, seed: int = 0, **kwargs: Any) -> Path:
        path = builder(out, seed, **kwargs)
        marker = {"u2s_tiny": True, "weights": "random", "builder": builder.__name__, "seed": seed}
        (path / TINY_MARKER).write_text(json.dumps(marker), encoding="utf-8")
        return path

    return build


#: Default weight seeds. A random VLM's greedy flag is often the same for every image; with seed 10
#: the demo samples get a mix of flagged and unflagged rows, so both paths of the pipeline run.
DEFAULT_SEEDS = {"vlm": 10, "llm": 0, "instruct_pix2pix": 0, "sd3": 0, "flux_kontext": 0, "clip": 0}


def _byte_unicode() -> list[str]:
    """GPT-2's reversible byte → printable unicode map (what byte-level BPE vocabularies use)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def qwen_tokenizer():
    """A byte-level Qwen2 tokenizer: 256 byte tokens, no merges, ChatML specials and template."""
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(_byte_unicode())}
    for token in QWEN_SPECIALS:
        vocab[token] = len(vocab)
    tok = Qwen2Tokenizer(
        vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS[1:]})
    tok.chat_template = CHATML_TEMPLATE
    tok.padding_side = "left"
    return tok


def clip_tokenizer():
    """A byte-level CLIP tokenizer (514 tokens, no merges), as Stable Diffusion pipelines use."""
    from transformers import CLIPTokenizer

    chars = _byte_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def _qwen2_text_config(tok, **overrides):
    from transformers import Qwen2Config

    ids = tok.convert_tokens_to_ids
    kwargs = dict(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192,
        eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"), bos_token_id=None,
        tie_word_embeddings=False,
    )  # fmt: skip
    kwargs.update(overrides)
    return Qwen2Config(**kwargs)


def _save_generation_config(tok, out: Path) -> None:
    from transformers import GenerationConfig

    ids = tok.convert_tokens_to_ids
    GenerationConfig(eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>")).save_pretrained(out)


@_marked
def build_tiny_llm(out: str | Path, seed: int = 0) -> Path:
    """Qwen2 causal LM (head_dim 64, which vLLM's CPU attention needs) + tokenizer, saved to ``out``."""
    import torch
    from transformers import Qwen2ForCausalLM

    out = Path(out)
    torch.manual_seed(seed)
    tok = qwen_tokenizer()
    model = Qwen2ForCausalLM(_qwen2_text_config(tok)).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    _save_generation_config(tok, out)
    return out


@_marked
def build_tiny_vlm(out: str | Path, seed: int = 0) -> Path:
    """LLaVA (CLIP vision tower + Qwen2 text) with a full `LlavaProcessor`, saved to ``out``."""
    import torch
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    out = Path(out)
    torch.manual_seed(seed)
    tok = qwen_tokenizer()
    # 256 image tokens: enough for the random weights' greedy output to depend on the image.
    image_size, patch = 112, 7
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
        chat_template=CHATML_TEMPLATE, num_additional_image_tokens=1,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=image_size, patch_size=patch, projection_dim=32,
        ),
        text_config=_qwen2_text_config(tok, hidden_size=64, intermediate_size=128, head_dim=32),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1,
    )  # fmt: skip
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    _save_generation_config(tok, out)
    return out


@_marked
def build_tiny_instruct_pix2pix(out: str | Path, seed: int = 0) -> Path:
    """InstructPix2Pix pipeline (8-channel UNet, tiny VAE and CLIP text encoder), saved to ``out``."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        StableDiffusionInstructPix2PixPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    out = Path(out)
    torch.manual_seed(seed)
    tok = clip_tokenizer()
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=8, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, norm_num_groups=32,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
    )  # fmt: skip
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
            num_attention_heads=4, num_hidden_layers=2, pad_token_id=1, vocab_size=len(tok),
            max_position_embeddings=77,
        )
    )  # fmt: skip
    scheduler = EulerAncestralDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(out)
    return out


def t5_tokenizer():
    """A character-level T5 tokenizer (Unigram over ~70 single characters), as SD3 and FLUX use."""
    from transformers import T5Tokenizer

    chars = "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _tiny_flow_vae(latent_channels: int):
    """An `AutoencoderKL` with 4 blocks (8x downsampling, like SD3's and FLUX's) and SD3's latent shift."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(4, 4, 4, 4), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035, sample_size=32,
    )  # fmt: skip


def _tiny_clip_text_config(tok):
    from transformers import CLIPTextConfig

    ids = tok.convert_tokens_to_ids
    return CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32,
        vocab_size=len(tok), max_position_embeddings=77, bos_token_id=ids("<|startoftext|>"),
        eos_token_id=ids("<|endoftext|>"), pad_token_id=ids("<|endoftext|>"),
    )  # fmt: skip


def _tiny_t5(tok, d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        )
    )  # fmt: skip


@_marked
def build_tiny_sd3(out: str | Path, seed: int = 0) -> Path:
    """Stable Diffusion 3 (two projected CLIP encoders, T5, SD3 transformer, 8x VAE), saved to ``out``."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    out = Path(out)
    torch.manual_seed(seed)
    tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    # Text widths as in SD3: the two CLIP hidden states (32 + 32) are zero-padded to T5's width (64).
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64,
    )  # fmt: skip
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_tiny_flow_vae(4),
        text_encoder=CLIPTextModelWithProjection(_tiny_clip_text_config(tok)), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(_tiny_clip_text_config(tok)), tokenizer_2=tok,
        text_encoder_3=_tiny_t5(t5_tok, 64), tokenizer_3=t5_tok,
    )  # fmt: skip
    pipe.save_pretrained(out)
    return out


@_marked
def build_tiny_flux_kontext(out: str | Path, seed: int = 0) -> Path:
    """FLUX.1 Kontext (CLIP + T5 encoders, FLUX transformer, 8x VAE), saved to ``out``."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    out = Path(out)
    torch.manual_seed(seed)
    tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    # 4 latent channels packed 2x2 into 16 transformer channels (FLUX: 16 → 64).
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # fmt: skip
    pipe = FluxKontextPipeline(
        scheduler=scheduler, vae=_tiny_flow_vae(4), text_encoder=CLIPTextModel(_tiny_clip_text_config(tok)),
        tokenizer=tok, text_encoder_2=_tiny_t5(t5_tok, 32), tokenizer_2=t5_tok, transformer=transformer,
    )  # fmt: skip
    pipe.save_pretrained(out)
    return out


@_marked
def build_tiny_clip(out: str | Path, seed: int = 0) -> Path:
    """CLIP (`CLIPModel`, 32 px ViT + byte-level text tower) with a `CLIPProcessor`, saved to ``out``: the
    evaluation's CLIP scores load it exactly as they load ``openai/clip-vit-large-patch14``."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPVisionConfig
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    out = Path(out)
    torch.manual_seed(seed)
    tok = clip_tokenizer()
    image_size = 32
    config = CLIPConfig(
        text_config=_tiny_clip_text_config(tok).to_dict(),
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            image_size=image_size, patch_size=8, projection_dim=32,
        ).to_dict(),
        projection_dim=32,
    )  # fmt: skip
    CLIPModel(config).eval().save_pretrained(out)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(out)
    return out


#: Keypoints of the tiny SCRFD detector, in strides from its anchor: eyes, nose, mouth corners.
TINY_SCRFD_KPS = ((-0.3, -0.2), (0.3, -0.2), (0.0, 0.1), (-0.25, 0.4), (0.25, 0.4))


@_marked
def build_tiny_antelopev2(out: str | Path, seed: int = 0, embedding_dim: int = 64) -> Path:
    """An InsightFace ``antelopev2``-shaped folder of two tiny ONNX models, exported with torch.onnx.

    ``scrfd_10g_bnkps.onnx`` has SCRFD's signature (input 1×3×H×W normalised as ``(x - 127.5) / 128``;
    nine outputs: scores, box distances and keypoint offsets for strides 8, 16, 32, two anchors each) and
    fixed weights that make it a bright-square detector: a stride-32 cell whose mean is near white scores
    ~0.99 with a box one stride around its anchor and keypoints :data:`TINY_SCRFD_KPS`; finer strides
    never fire. ``glintr100.onnx`` has ArcFace's signature (N×3×112×112 → N×``embedding_dim``) and
    random weights (``seed``).
    """
    import torch
    from torch import nn

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    class Scrfd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads = nn.ModuleList(
                nn.ModuleList([nn.Conv2d(3, 2, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(3, 20, 1)]) for _ in range(3)
            )
            with torch.no_grad():
                for level, (score, box, kps) in enumerate(self.heads):
                    for conv in (score, box, kps):
                        conv.weight.zero_()
                    fires = level == 2
                    score.weight.fill_(10 / 3 if fires else 0.0)
                    score.bias.fill_(-5.0 if fires else -20.0)
                    box.bias.fill_(1.0)
                    kps.bias.copy_(torch.tensor(TINY_SCRFD_KPS).flatten().repeat(2))

        def forward(self, x):
            scores, boxes, kpss = [], [], []
            for stride, (score, box, kps) in zip((8, 16, 32), self.heads, strict=True):
                f = nn.functional.avg_pool2d(x, stride)
                scores.append(torch.sigmoid(score(f)).permute(0, 2, 3, 1).reshape(1, -1, 1))
                boxes.append(box(f).permute(0, 2, 3, 1).reshape(1, -1, 4))
                kpss.append(kps(f).permute(0, 2, 3, 1).reshape(1, -1, 10))
            return (*scores, *boxes, *kpss)

    torch.manual_seed(seed)
    recognizer = nn.Sequential(
        nn.Conv2d(3, 8, 8, stride=8), nn.ReLU(), nn.AvgPool2d(7), nn.Flatten(), nn.Linear(32, embedding_dim)
    ).eval()  # fmt: skip
    names = [f"{kind}_{stride}" for kind in ("score", "bbox", "kps") for stride in (8, 16, 32)]
    torch.onnx.export(
        Scrfd().eval(), (torch.zeros(1, 3, 64, 64),), str(out / "scrfd_10g_bnkps.onnx"), dynamo=False,
        input_names=["input.1"], output_names=names, dynamic_axes={"input.1": {2: "h", 3: "w"}},
    )  # fmt: skip
    torch.onnx.export(
        recognizer, (torch.zeros(1, 3, 112, 112),), str(out / "glintr100.onnx"), dynamo=False,
        input_names=["input.1"], output_names=["embedding"],
        dynamic_axes={"input.1": {0: "n"}, "embedding": {0: "n"}},
    )  # fmt: skip
    return out


def build_all(root: str | Path, seed_offset: int = 0) -> dict[str, Path]:
    """Build every tiny model under ``root/<name>`` (seeds: DEFAULT_SEEDS + offset); returns name → folder."""
    root = Path(root)
    return {
        name: globals()[builder](root / name, seed=DEFAULT_SEEDS[name] + seed_offset)
        for name, builder in TINY_MODELS.items()
    }


def find_tiny_vlm(out: str | Path, accept: Callable[[Path], bool], seeds: range = range(64)) -> Path:
    """A tiny VLM at ``out`` whose answers ``accept`` approves: the first weight seed, in order, that
    passes ``accept(out)``.

    A random model's answers are a property of its weights. Tests that need particular outcomes (both a
    flagged and a kept image, say) get them by this construction instead of by a seed picked once by hand,
    which a torch or transformers upgrade that changes random initialisation would silently break.
    """
    out = Path(out)
    for seed in seeds:
        build_tiny_vlm(out, seed)
        if accept(out):
            return out
    raise RuntimeError(f"no weight seed in {seeds} gives a tiny VLM with the wanted answers")


def tiny_stage1_config(
    vlm: str | Path,
    llm: str | Path | None = None,
    image_size: int = 112,
    budgets: dict[str, Any] | None = None,
    **fields: Any,
) -> Any:
    """A stage-1 config running tiny models on CPU, one thread per call: ``budgets`` maps a call to its
    ``max_new_tokens`` or to a `GenerationConfig`; every call gets its own one-thread pool."""
    from u2s.config import GenerationConfig, ModelConfig, Resources, Stage1Config

    vlm = Path(vlm)
    pool = Resources(batch_size=4, torch_threads=1)
    calls = {
        call: {"generation": budget if isinstance(budget, GenerationConfig) else
               GenerationConfig(max_new_tokens=budget), "resources": pool}
        for call, budget in (budgets or {"inspect": 512}).items()
    }  # fmt: skip
    return Stage1Config.model_validate({
        "vlm": ModelConfig(model=str(vlm), dtype="float32", device="cpu"),
        "llm": ModelConfig(model=str(llm or vlm.parent / "llm-unused"), dtype="float32", device="cpu"),
        "image_size": image_size, "calls": calls, **fields,
    })  # fmt: skip


def build_tiny_vlm_flagging_some(
    out: str | Path, probes: list[bytes], image_size: int = 112, max_new_tokens: int = 512, at_least: int = 2
) -> tuple[Path, list[bool | None]]:
    """A tiny VLM that, with greedy call A on ``probes`` (encoded images), flags at least ``at_least``
    of them and keeps at least ``at_least`` (see :func:`find_tiny_vlm`). Returns the folder and the
    probes' flags."""
    from u2s.stage1.inspect import InspectStage
    from u2s.testing.rows import decoded_rows, run_stage

    flags: list[bool | None] = []

    def splits(vlm: Path) -> bool:
        stage = InspectStage(
            tiny_stage1_config(vlm, image_size=image_size, budgets={"inspect": max_new_tokens})
        )
        rows = run_stage(stage, decoded_rows(probes, thumbnail_side=image_size))
        flags[:] = [row["privacy_flag"] for row in rows]
        return flags.count(True) >= at_least and flags.count(False) >= at_least

    return find_tiny_vlm(out, splits), flags

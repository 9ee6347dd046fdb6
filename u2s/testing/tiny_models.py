"""Tiny, randomly initialised models of every family u2s loads, built offline from configs.

Nothing here is used by the pipeline itself: these builders write ordinary `save_pretrained` folders
that the production loaders then read back with `from_pretrained`, exactly as they read real weights.
Tokenizers are byte-level and built in memory, so no hub access is ever needed. Every model is under
10 MB and builds in about a second; weights depend only on ``seed``.
"""

from __future__ import annotations

from pathlib import Path

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
}

#: Default weight seeds. A random VLM's greedy flag is often the same for every image; with seed 10
#: the demo samples get a mix of flagged and unflagged rows, so both paths of the pipeline run.
DEFAULT_SEEDS = {"vlm": 10, "llm": 0, "instruct_pix2pix": 0}


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


def build_all(root: str | Path, seed_offset: int = 0) -> dict[str, Path]:
    """Build every tiny model under ``root/<name>`` (seeds: DEFAULT_SEEDS + offset); returns name → folder."""
    root = Path(root)
    return {
        name: globals()[builder](root / name, seed=DEFAULT_SEEDS[name] + seed_offset)
        for name, builder in TINY_MODELS.items()
    }

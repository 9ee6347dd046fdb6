"""InstructPix2Pix + SafeAttention: the paper's dual-condition editor (PAPER.md §3.2).

The IP2P pipeline loads exactly as for the plain editor; every cross-attention then gets a
:class:`~u2s.stage2.safe_attention_processor.SafeAttentionProcessor` (variant from
``stage2.safe_attention.variant``), whose weights come from ``stage2.safe_attention.weights`` when set.
Untrained processors reproduce plain IP2P on the edit instruction (their public scale λ is 0).

Each row's public caption ``c_p`` and edit instruction ``c_e`` are CLIP-encoded separately with the
pipeline's own tokenizer and text encoder and passed as ``prompt_embeds = [c_p ; c_e]`` (B, 2·77, D).
IP2P's classifier-free guidance runs three branches (text+image, image only, unconditional) and builds
its batch as ``[prompt_embeds, negative_prompt_embeds, negative_prompt_embeds]``; the negative here is
the empty-string embedding in both halves, ``[∅ ; ∅]``, the training recipe's "both texts empty", so
every branch hands the processors a 154-token context.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from u2s.config_base import model_location
from u2s.stage2.editors.base import Editor, EditPrompt, compile_denoiser, fit_long_side, seeded_generators
from u2s.stage2.editors.instruct_pix2pix import InstructPix2PixConfig, load_finetuned_unet, load_ip2p_pipeline

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from u2s.config_base import StorageConfig
    from u2s.stage2.editors.base import Stage2Settings


class SafeAttentionConfig(InstructPix2PixConfig):
    """IP2P's settings (same defaults) plus the SafeAttention branch (``stage2.safe_attention``)."""

    variant: Literal["gated", "fusion"] = Field(
        "gated", description="gated: shared query, learned gate + zero-initialised public scale (variant G); "
        "fusion: public Q/K/V copies + learned Conv1d fuser over both attention maps (variant F).",
    )  # fmt: skip
    weights: str | None = Field(
        None,
        description="Saved SafeAttention weights: a folder or its .safetensors file, local or s3:// "
        "(staged into the model cache like the model); a `u2s finetune` checkpoint folder also brings "
        "its full UNet (`unet/`) or LoRA adapters (`lora/`). None: untrained, equals plain IP2P.",
    )

    _weights_location = field_validator("weights")(model_location)

    def stage1_texts(self) -> frozenset[str]:
        return frozenset({"edit_instruction", "public_caption"})


class SafeAttentionEditor(Editor):
    """IP2P with SafeAttention on every ``attn2``; one batched pipeline call per :meth:`edit`.

    Working sizes are IP2P's (long side ``resolution``, sides multiples of 64).
    """

    name = "safe_attention"
    config_class = SafeAttentionConfig
    config: SafeAttentionConfig

    def __init__(self, stage2: Stage2Settings, storage: StorageConfig | None = None) -> None:
        from u2s.io.model_store import local_location
        from u2s.stage2.safe_attention_processor import install_safe_attention, load_safe_attention

        super().__init__(stage2, storage)
        self.device, self.pipe = load_ip2p_pipeline(self.config.model, storage)
        weights = local_location(self.config.weights, storage) if self.config.weights else None
        if weights:
            load_finetuned_unet(self.pipe, weights)  # before the processors, as the weights were trained
        self.processors = install_safe_attention(self.pipe.unet, self.config.variant)
        if weights:
            # Raises if the saved variant is not the configured one, or if any weight is missing.
            load_safe_attention(self.pipe.unet, weights)
        compile_denoiser(self.pipe, stage2)  # after the processors: they are part of the compiled graph

    def working_size(self, width: int, height: int) -> tuple[int, int]:
        return fit_long_side(width, height, self.config.resolution)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """CLIP-encode ``texts`` as the IP2P pipeline does (77 tokens, padded/truncated): (B, 77, D)."""
        tokenizer, text_encoder = self.pipe.tokenizer, self.pipe.text_encoder
        tokens = tokenizer(
            texts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = None
        if getattr(text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.device)
        embeds = text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]
        return embeds.to(dtype=text_encoder.dtype, device=self.device)

    def prompt_embeds(self, prompts: list[EditPrompt]) -> tuple[torch.Tensor, torch.Tensor]:
        """(``[c_p ; c_e]``, ``[∅ ; ∅]``), each (B, 2·77, D), for the pipeline's CFG branches."""
        import torch

        public = self.encode_texts([p.public_caption for p in prompts])
        edit = self.encode_texts([p.edit_instruction for p in prompts])
        empty = self.encode_texts([""]).expand(len(prompts), -1, -1)
        return torch.cat([public, edit], dim=1), torch.cat([empty, empty], dim=1)

    def generate(
        self,
        images: list[Image.Image],
        prompts: list[EditPrompt],
        seeds: list[int],
        output_type: str = "pil",
    ) -> Any:
        """Run the pipeline on one batch; returns its ``images`` (PIL list, or an array for "np")."""
        import torch

        self.check_batch(images, prompts, seeds)
        generators = seeded_generators(self.device, seeds)
        with torch.inference_mode():
            prompt_embeds, negative_prompt_embeds = self.prompt_embeds(prompts)
            return self.pipe(
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                image=list(images),
                num_inference_steps=self.config.num_inference_steps,
                guidance_scale=self.config.guidance_scale,
                image_guidance_scale=self.config.image_guidance_scale,
                generator=generators,
                output_type=output_type,
            ).images

    def _edit(
        self,
        images: list[Image.Image],
        prompts: list[EditPrompt],
        seeds: list[int],
    ) -> list[Image.Image]:
        out = self.generate(images, prompts, seeds)
        size = images[0].size
        return [img if img.size == size else img.resize(size) for img in out]

"""InstructPix2Pix (diffusers): edits an image following a text instruction.

The paper's trained editor starts from MagicBrush-finetuned IP2P weights; any
`StableDiffusionInstructPix2PixPipeline` folder or hub id loads here. The public caption is not used
(plain IP2P has a single text condition; the SafeAttention variant adds the second one). Images are
edited at a working size: long side ``resolution``, sides multiples of 64.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator

from u2s.config_base import ModelConfig, model_location
from u2s.stage2.editors.base import (
    Editor,
    EditorConfig,
    EditPrompt,
    compile_denoiser,
    fit_long_side,
    load_pipeline,
    seeded_generators,
)

if TYPE_CHECKING:
    from PIL import Image

    from u2s.config_base import StorageConfig
    from u2s.stage2.editors.base import Stage2Settings


class InstructPix2PixConfig(EditorConfig):
    """InstructPix2Pix settings (``stage2.instruct_pix2pix``); defaults are the paper's (PAPER.md §3.3)."""

    model: ModelConfig = Field(
        ..., description="A StableDiffusionInstructPix2PixPipeline (HF id or local path); the paper's is "
        "the MagicBrush fine-tune vinesmsuic/magicbrush-jul7.",
    )  # fmt: skip
    num_inference_steps: int = Field(100, ge=1, description="Denoising steps.")
    guidance_scale: float = Field(7.5, ge=0, description="Text guidance (cfg-text).")
    image_guidance_scale: float = Field(1.5, ge=0, description="Image guidance (cfg-image).")
    resolution: int = Field(
        512, ge=64, description="Working size: the long side, sides rounded to multiples of 64."
    )
    weights: str | None = Field(
        None,
        description="A `u2s finetune` checkpoint folder, local or s3:// (staged into the model cache like "
        "the model): its full UNet (`unet/`) or LoRA adapters (`lora/`) load over the model's. None: the "
        "model as it is.",
    )

    _weights_location = field_validator("weights")(model_location)


def load_finetuned_unet(pipe: Any, folder: str) -> None:
    """Load a `u2s finetune` checkpoint's UNet weights into ``pipe``: a full UNet (``folder/unet``) replaces
    the pipeline's weights, LoRA adapters (``folder/lora``) are added with ``load_lora_weights``. A folder
    with neither (SafeAttention weights only) changes nothing here."""
    from pathlib import Path

    path = Path(folder)
    if (path / "unet").is_dir():
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(path / "unet", dtype=pipe.unet.dtype)
        pipe.unet.load_state_dict(unet.state_dict())
    if (path / "lora").is_dir():
        pipe.load_lora_weights(str(path / "lora"))


def load_ip2p_pipeline(model: ModelConfig, storage: StorageConfig | None = None) -> tuple[str, Any]:
    """Load ``model`` as a `StableDiffusionInstructPix2PixPipeline` on its device.

    Shared by every IP2P-based editor (plain and SafeAttention). No safety checker, no progress bar;
    the model libraries' input-echoing warnings are silenced first. Returns (device, pipeline).
    """
    from diffusers import StableDiffusionInstructPix2PixPipeline

    return load_pipeline(StableDiffusionInstructPix2PixPipeline, model, storage, safety_checker=None)


class InstructPix2PixEditor(Editor):
    """One batched `StableDiffusionInstructPix2PixPipeline` call per :meth:`edit`, seeded per image."""

    name = "instruct_pix2pix"
    config_class = InstructPix2PixConfig
    config: InstructPix2PixConfig

    def __init__(self, stage2: Stage2Settings, storage: StorageConfig | None = None) -> None:
        super().__init__(stage2, storage)
        self.device, self.pipe = load_ip2p_pipeline(self.config.model, storage)
        if self.config.weights:
            from u2s.io.model_store import local_location

            load_finetuned_unet(self.pipe, local_location(self.config.weights, storage))
        compile_denoiser(self.pipe, stage2)

    def working_size(self, width: int, height: int) -> tuple[int, int]:
        return fit_long_side(width, height, self.config.resolution)

    def _edit(
        self,
        images: list[Image.Image],
        prompts: list[EditPrompt],
        seeds: list[int],
    ) -> list[Image.Image]:
        import torch

        cfg = self.config
        generators = seeded_generators(self.device, seeds)
        with torch.inference_mode():
            out = self.pipe(
                prompt=[p.edit_instruction for p in prompts],
                image=list(images),
                num_inference_steps=cfg.num_inference_steps,
                guidance_scale=cfg.guidance_scale,
                image_guidance_scale=cfg.image_guidance_scale,
                generator=generators,
            ).images
        size = images[0].size
        return [img if img.size == size else img.resize(size) for img in out]

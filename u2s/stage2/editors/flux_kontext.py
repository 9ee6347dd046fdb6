"""FLUX.1 Kontext (diffusers): an in-context instruction editor, the modern alternative to IP2P.

Edits follow the row's edit instruction. Kontext normally snaps its input to one of its preferred
training resolutions; here it works at the editor's working size instead (long side ``resolution``,
sides multiples of 64; ``_auto_resize=False`` and ``max_area`` = the working area, so neither the input
nor the output is resized by the pipeline), with sides floored to the pipeline's multiple (16 for FLUX)
for other sizes. Outputs come back at the input size. ``guidance_scale`` is FLUX's distilled guidance
(an embedding input, not classifier-free guidance).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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


class FluxKontextConfig(EditorConfig):
    """FLUX.1 Kontext settings (``stage2.flux_kontext``); defaults are diffusers' for Kontext."""

    model: ModelConfig = Field(
        ...,
        description="A FluxKontextPipeline (HF id or local path), e.g. black-forest-labs/FLUX.1-Kontext-dev.",
    )
    num_inference_steps: int = Field(28, ge=1, description="Denoising steps.")
    guidance_scale: float = Field(2.5, ge=0, description="FLUX's distilled guidance (an embedding input).")
    resolution: int = Field(
        1024, ge=64, description="Working size: the long side (Kontext is trained near 1 MP), sides rounded "
        "to multiples of 64.",
    )  # fmt: skip
    weights: str | None = Field(
        None, description="A LoRA adapter for the transformer, local or s3://: a `u2s finetune` checkpoint "
        "(its `lora/`) or a diffusers LoRA folder, loaded with `load_lora_weights`; None: the base model.",
    )  # fmt: skip

    _weights_location = field_validator("weights")(model_location)


class FluxKontextEditor(Editor):
    """One batched `FluxKontextPipeline` call per :meth:`edit`, seeded per image."""

    name = "flux_kontext"
    config_class = FluxKontextConfig
    config: FluxKontextConfig

    def __init__(self, stage2: Stage2Settings, storage: StorageConfig | None = None) -> None:
        from diffusers import FluxKontextPipeline

        super().__init__(stage2, storage)
        self.device, self.pipe = load_pipeline(FluxKontextPipeline, self.config.model, storage)
        if self.config.weights:
            from pathlib import Path

            from u2s.io.model_store import local_location

            path = Path(local_location(self.config.weights, storage))
            self.pipe.load_lora_weights(str(path / "lora" if (path / "lora").is_dir() else path))
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
        from PIL import Image

        size = images[0].size
        multiple = self.pipe.vae_scale_factor * 2  # VAE downsampling times FLUX's 2x2 latent packing
        width, height = (max(multiple, side // multiple * multiple) for side in size)
        if (width, height) != size:
            images = [img.resize((width, height), Image.Resampling.LANCZOS) for img in images]
        generators = seeded_generators(self.device, seeds)
        with torch.inference_mode():
            out = self.pipe(
                image=list(images),
                prompt=[p.edit_instruction for p in prompts],
                guidance_scale=self.config.guidance_scale,
                num_inference_steps=self.config.num_inference_steps,
                generator=generators,
                height=height,
                width=width,
                max_area=width * height,
                _auto_resize=False,
            ).images
        return [img if img.size == size else img.resize(size, Image.Resampling.LANCZOS) for img in out]

"""InstructPix2Pix (diffusers): edits an image following a text instruction.

The paper's trained editor starts from MagicBrush-finetuned IP2P weights; any
`StableDiffusionInstructPix2PixPipeline` folder or hub id loads here. The public caption is not used
(plain IP2P has a single text condition; the SafeAttention variant adds the second one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from PIL import Image

from u2s.log_privacy import silence_input_echo
from u2s.stage2.editors.base import Editor, EditPrompt
from u2s.torch_utils import resolve_device, resolve_dtype

if TYPE_CHECKING:
    from u2s.config import Stage2Config


class InstructPix2PixEditor(Editor):
    """One batched `StableDiffusionInstructPix2PixPipeline` call per :meth:`edit`, seeded per image."""

    name = "instruct_pix2pix"

    def __init__(self, config: Stage2Config) -> None:
        from diffusers import StableDiffusionInstructPix2PixPipeline

        silence_input_echo()
        self.config = config
        self.device = resolve_device(config.model.device)
        self.pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
            config.model.model,
            revision=config.model.revision,
            dtype=resolve_dtype(config.model.dtype, self.device),
            safety_checker=None,
        ).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)

    def edit(
        self,
        images: list[Image.Image],
        prompts: list[EditPrompt],
        seeds: list[int],
    ) -> list[Image.Image]:
        import torch

        self.check_batch(images, prompts, seeds)
        if not images:
            return []
        generators = [torch.Generator(self.device).manual_seed(seed) for seed in seeds]
        with torch.inference_mode():
            out = self.pipe(
                prompt=[p.edit_instruction for p in prompts],
                image=list(images),
                num_inference_steps=self.config.num_inference_steps,
                guidance_scale=self.config.guidance_scale,
                image_guidance_scale=self.config.image_guidance_scale,
                generator=generators,
            ).images
        size = images[0].size
        return [img if img.size == size else img.resize(size) for img in out]

"""InstructPix2Pix (diffusers): edits an image following a text instruction.

The paper's trained editor starts from MagicBrush-finetuned IP2P weights; any
`StableDiffusionInstructPix2PixPipeline` folder or hub id loads here. The public caption is not used
(plain IP2P has a single text condition; the SafeAttention variant adds the second one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from PIL import Image

from u2s.stage2.editors.base import Editor, EditPrompt, compile_denoiser, load_pipeline, seeded_generators

if TYPE_CHECKING:
    from u2s.config import Stage2Config


def load_ip2p_pipeline(config: Stage2Config) -> tuple[str, Any]:
    """Load ``config.model`` as a `StableDiffusionInstructPix2PixPipeline` on its device.

    Shared by every IP2P-based editor (plain and SafeAttention). No safety checker, no progress bar;
    the model libraries' input-echoing warnings are silenced first. Returns (device, pipeline).
    """
    from diffusers import StableDiffusionInstructPix2PixPipeline

    return load_pipeline(StableDiffusionInstructPix2PixPipeline, config, safety_checker=None)


class InstructPix2PixEditor(Editor):
    """One batched `StableDiffusionInstructPix2PixPipeline` call per :meth:`edit`, seeded per image."""

    name = "instruct_pix2pix"

    def __init__(self, config: Stage2Config) -> None:
        self.config = config
        self.device, self.pipe = load_ip2p_pipeline(config)
        compile_denoiser(self.pipe, config)

    def _edit(
        self,
        images: list[Image.Image],
        prompts: list[EditPrompt],
        seeds: list[int],
    ) -> list[Image.Image]:
        import torch

        generators = seeded_generators(self.device, seeds)
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

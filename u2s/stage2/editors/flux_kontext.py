"""FLUX.1 Kontext (diffusers): an in-context instruction editor, the modern alternative to IP2P.

Edits follow the row's edit instruction. Kontext normally snaps its input to one of its preferred
training resolutions; here it works at the runner's working size instead (``_auto_resize=False`` and
``max_area`` = the working area, so neither the input nor the output is resized by the pipeline), with
sides floored to the pipeline's multiple (16 for FLUX) if needed. Outputs come back at the input size.
``guidance_scale`` is FLUX's distilled guidance (an embedding input, not classifier-free guidance).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from PIL import Image

from u2s.stage2.editors.base import Editor, EditPrompt, compile_denoiser, load_pipeline, seeded_generators

if TYPE_CHECKING:
    from u2s.config import Stage2Config


class FluxKontextEditor(Editor):
    """One batched `FluxKontextPipeline` call per :meth:`edit`, seeded per image."""

    name = "flux_kontext"

    def __init__(self, config: Stage2Config) -> None:
        from diffusers import FluxKontextPipeline

        self.config = config
        self.device, self.pipe = load_pipeline(FluxKontextPipeline, config)
        compile_denoiser(self.pipe, config)

    def _edit(
        self,
        images: list[Image.Image],
        prompts: list[EditPrompt],
        seeds: list[int],
    ) -> list[Image.Image]:
        import torch

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

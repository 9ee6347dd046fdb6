"""FlowEdit on Stable Diffusion 3 (Kulikov et al., training-free and inversion-free; PAPER.md §3.1).

FlowEdit maps the source image straight to an edited one along an ODE whose velocity is the difference
of the model's target- and source-conditioned velocities, without inverting the image to noise. With
timesteps ``t_0 = 1 > t_1 > ... > t_T = 0`` (the scheduler's sigmas), the clean source latent
``X_src`` and ``Z_edit = X_src`` at the start, each step ``i`` with ``T - n_max <= i < T - n_min``
(the first ``n_max`` steps counted from the noisy end; earlier steps are skipped) does::

    for k in 1..n_avg:                                    # fresh noise N_k ~ N(0, I) per draw
        Z_src = (1 - t_i) X_src + t_i N_k                 # the source, noised to t_i
        Z_tgt = Z_edit + Z_src - X_src                    # the edit, carried to the same noise
        V_delta += (v_tgt(Z_tgt, t_i) - v_src(Z_src, t_i)) / n_avg
    Z_edit += (t_{i+1} - t_i) V_delta

where ``v_c(z) = v(z, "") + g_c (v(z, c) - v(z, ""))`` is the velocity with classifier-free guidance
against the empty prompt (source scale ``g_src``, target scale ``g_tgt``). With ``n_min > 0`` the last
``n_min`` steps sample plainly from the target, starting from ``Z_tgt`` built with one more draw:
``Z_tgt += (t_{i+1} - t_i) v_tgt(Z_tgt, t_i)``. The result is decoded by the VAE. With ``n_max = 0``
nothing is edited (the output is the VAE round trip of the input), and with equal prompts and equal
scales ``V_delta`` is exactly zero.

Prompts: the source prompt is the ``source_prompt`` column (private caption by default), the target
the ``target_prompt`` column (the combined caption by default; a row without a combined caption falls
back to its public caption). Sizes, as in the paper: each image is edited near its native size, its long
side capped at ``max_side`` (1536) and each side floored to a multiple of ``side_multiple`` (16, and of
the model's latent patch, 16 for SD3) (:meth:`FlowEditSD3Editor.working_size`). The authors' code crops
to the multiple; here the image is resized to it instead (at most ``side_multiple - 1`` pixels per side),
so no border is lost when the runner resizes the output back to the original size.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from u2s.config_base import ModelConfig
from u2s.stage2.editors.base import (
    Editor,
    EditorConfig,
    EditPrompt,
    compile_denoiser,
    load_pipeline,
    seeded_generators,
)

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from u2s.config_base import StorageConfig
    from u2s.stage2.editors.base import Stage2Settings

#: Text length of the T5 encoder (the SD3 pipeline's default).
MAX_SEQUENCE_LENGTH = 256


class FlowEditSD3Config(EditorConfig):
    """FlowEdit on Stable Diffusion 3 (``stage2.flowedit_sd3``); defaults are the paper's (PAPER.md §3.1)."""

    model: ModelConfig = Field(
        ..., description="A StableDiffusion3Pipeline (HF id or local path); the paper's is "
        "stabilityai/stable-diffusion-3-medium-diffusers.",
    )  # fmt: skip
    num_inference_steps: int = Field(50, ge=1, description="Scheduler steps T (the ODE's grid).")
    source_prompt: Literal["private_caption", "public_caption"] = Field(
        "private_caption", description="Column describing the original image."
    )
    target_prompt: Literal["public_caption", "combined_caption", "edit_instruction"] = Field(
        "combined_caption",
        description="Column describing the wanted image: combined_caption (public caption with the edit "
        "applied, stage 1's combine call, switched on automatically for it) by default.",
    )
    source_guidance_scale: float = Field(3.5, ge=0, description="CFG of the source branch.")
    target_guidance_scale: float = Field(13.5, ge=0, description="CFG of the target branch.")
    n_max: int = Field(
        33, ge=0, description="Edit only the first n_max of the steps (from the noisy end); 0: no edit."
    )
    n_min: int = Field(0, ge=0, description="Last n_min steps use plain sampling from the target.")
    n_avg: int = Field(1, ge=1, description="Noise samples averaged per step.")
    max_side: int = Field(1536, ge=64, description="Working size: the long side is capped at this.")
    side_multiple: int = Field(16, ge=1, description="Working size: sides are floored to a multiple of this.")

    @model_validator(mode="after")
    def _n_min_within_n_max(self) -> FlowEditSD3Config:
        if self.n_min > self.n_max:
            raise ValueError(f"n_min ({self.n_min}) must not exceed n_max ({self.n_max})")
        return self

    def stage1_texts(self) -> frozenset[str]:
        return frozenset({self.source_prompt, self.target_prompt})


def flowedit_size(width: int, height: int, max_side: int, multiple: int) -> tuple[int, int]:
    """Native size with the long side capped at ``max_side``, each side floored to ``multiple``.

    Never upscales (but a side shorter than ``multiple`` becomes ``multiple``); the long side stays
    within ``max_side`` when ``max_side`` is at least ``multiple``.
    """
    if width < 1 or height < 1:
        raise ValueError(f"invalid image size {width}x{height}")
    scale = min(1.0, max_side / max(width, height))
    w, h = (max(multiple, round(side * scale) // multiple * multiple) for side in (width, height))
    return w, h


class FlowEditSD3Editor(Editor):
    """FlowEdit with a `StableDiffusion3Pipeline`; both branches and both CFG halves in one model call."""

    name = "flowedit_sd3"
    config_class = FlowEditSD3Config
    config: FlowEditSD3Config

    def __init__(self, stage2: Stage2Settings, storage: StorageConfig | None = None) -> None:
        from diffusers import StableDiffusion3Pipeline

        super().__init__(stage2, storage)
        self.device, self.pipe = load_pipeline(StableDiffusion3Pipeline, self.config.model, storage)
        compile_denoiser(self.pipe, stage2)
        # A private scheduler: set_timesteps mutates it, and the pipeline's own stays untouched.
        self.scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        self.model_multiple = self.pipe.vae_scale_factor * self.pipe.patch_size

    @property
    def multiple(self) -> int:
        """Sides of working sizes are multiples of this: ``side_multiple`` and the model's latent patch."""
        return math.lcm(self.config.side_multiple, self.model_multiple)

    def working_size(self, width: int, height: int) -> tuple[int, int]:
        return flowedit_size(width, height, self.config.max_side, self.multiple)

    def _edit(
        self,
        images: list[Image.Image],
        prompts: list[EditPrompt],
        seeds: list[int],
    ) -> list[Image.Image]:
        import torch
        from PIL import Image

        fe = self.config
        size = images[0].size
        work = self.working_size(*size)  # the runner already gives images at it; direct calls may not
        batch = [img if img.size == work else img.resize(work, Image.Resampling.LANCZOS) for img in images]
        sources = [p.column(fe.source_prompt) for p in prompts]
        targets = [self._target(p) for p in prompts]
        generators = seeded_generators(self.device, seeds)
        with torch.inference_mode():
            x_src = self._encode_images(batch)
            embeds, pooled = self._encode_prompts(sources, targets)
            latents = self._flowedit(x_src, embeds, pooled, generators)
            out = self._decode(latents)
        return [img if img.size == size else img.resize(size, Image.Resampling.LANCZOS) for img in out]

    def _target(self, prompt: EditPrompt) -> str:
        column = self.config.target_prompt
        if column == "combined_caption" and not prompt.combined_caption:
            column = "public_caption"
        return prompt.column(column)

    def _encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        """Clean source latents X_src (float32), normalised with the VAE's shift and scaling factors."""
        import torch

        vae = self.pipe.vae
        pixels = self.pipe.image_processor.preprocess(images).to(self.device, vae.dtype)
        latents = vae.encode(pixels).latent_dist.mode()
        return ((latents - vae.config.shift_factor) * vae.config.scaling_factor).to(torch.float32)

    def _decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.pipe.vae
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        pixels = vae.decode(latents.to(vae.dtype)).sample
        return self.pipe.image_processor.postprocess(pixels, output_type="pil")

    def _encode_prompts(self, sources: list[str], targets: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text and pooled embeddings, batch order [empty, source, empty, target] (B rows each)."""
        import torch

        n = len(sources)
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=sources + targets, prompt_2=None, prompt_3=None, device=self.device,
            do_classifier_free_guidance=True, negative_prompt=[""] * (2 * n),
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )  # fmt: skip
        order = lambda pos, neg: torch.cat([neg[:n], pos[:n], neg[n:], pos[n:]])  # noqa: E731
        return order(embeds, negative), order(pooled, negative_pooled)

    def _timesteps(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The scheduler's timesteps (model scale) and sigmas t_i in [0, 1] (with the terminal 0)."""
        kwargs: dict[str, Any] = {}
        sched = self.scheduler
        if sched.config.get("use_dynamic_shifting", None):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            patch = self.pipe.patch_size
            kwargs["mu"] = calculate_shift(
                (latents.shape[-2] // patch) * (latents.shape[-1] // patch),
                sched.config.get("base_image_seq_len", 256),
                sched.config.get("max_image_seq_len", 4096),
                sched.config.get("base_shift", 0.5),
                sched.config.get("max_shift", 1.16),
            )
        sched.set_timesteps(self.config.num_inference_steps, device=self.device, **kwargs)
        return sched.timesteps, sched.sigmas

    def _noise(self, generators: list[torch.Generator], like: torch.Tensor) -> torch.Tensor:
        """One standard-normal draw per row, each from the row's own generator."""
        import torch

        return torch.stack(
            [
                torch.randn(like.shape[1:], generator=g, device=self.device, dtype=torch.float32)
                for g in generators
            ]
        )

    def _velocities(
        self, branches: list[torch.Tensor], t: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor
    ) -> list[torch.Tensor]:
        """Guided velocities of the given branches (source then target, or the target alone) in one call."""
        import torch

        fe = self.config
        scales = [fe.source_guidance_scale, fe.target_guidance_scale][-len(branches) :]
        n = branches[0].shape[0]
        if len(branches) == 1:  # the target's halves only
            embeds, pooled = embeds[2 * n :], pooled[2 * n :]
        model_input = torch.cat([z for z in branches for _ in (0, 1)]).to(self.pipe.transformer.dtype)
        v = self.pipe.transformer(
            hidden_states=model_input,
            timestep=t.expand(model_input.shape[0]),
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0].to(torch.float32)
        halves = v.chunk(2 * len(branches))
        return [
            uncond + scale * (cond - uncond)
            for uncond, cond, scale in zip(halves[0::2], halves[1::2], scales, strict=True)
        ]

    def _flowedit(
        self,
        x_src: torch.Tensor,
        embeds: torch.Tensor,
        pooled: torch.Tensor,
        generators: list[torch.Generator],
    ) -> torch.Tensor:
        """The FlowEdit ODE of the module docstring; returns the edited clean latents."""
        import torch

        fe = self.config
        timesteps, sigmas = self._timesteps(x_src)
        steps = len(timesteps)
        n_max = min(fe.n_max, steps)
        n_min = min(fe.n_min, n_max)
        z_edit = x_src.clone()
        z_tgt = None
        for i in range(steps - n_max, steps):
            t, t_i, t_next = timesteps[i], sigmas[i], sigmas[i + 1]
            if i < steps - n_min:
                v_delta = torch.zeros_like(x_src)
                for _ in range(fe.n_avg):
                    z_src = (1 - t_i) * x_src + t_i * self._noise(generators, x_src)
                    z_tgt = z_src + (z_edit - x_src)  # = Z_edit + Z_src - X_src, exact when Z_edit = X_src
                    v_src, v_tgt = self._velocities([z_src, z_tgt], t, embeds, pooled)
                    v_delta += (v_tgt - v_src) / fe.n_avg
                z_edit = z_edit + (t_next - t_i) * v_delta
            else:
                if i == steps - n_min:  # start plain target sampling from the edit, noised to t_i
                    z_src = (1 - t_i) * x_src + t_i * self._noise(generators, x_src)
                    z_tgt = z_src + (z_edit - x_src)
                (v_tgt,) = self._velocities([z_tgt], t, embeds, pooled)
                z_tgt = z_tgt + (t_next - t_i) * v_tgt
        return z_edit if n_min == 0 else z_tgt

"""The FLUX.1 Kontext LoRA training step: paired image-to-image edits (PAPER.md §3.4).

As diffusers' ``examples/dreambooth/train_dreambooth_lora_flux_kontext.py``: the target is the run's
edited image, the condition the original, the prompt the edit instruction. The target's VAE latent is
noised along the flow-matching path ``x_t = (1 - σ) x_0 + σ ε`` at a uniformly drawn training timestep,
packed into 2×2 patches and concatenated on the sequence axis with the packed original latent (its
position ids marked as the context image), and the transformer predicts the velocity ``ε - x_0`` under
an MSE loss on the target tokens. FLUX's distilled guidance enters as an embedding
(:data:`TRAIN_GUIDANCE`). Conditioning dropout as for IP2P: texts become the empty prompt's embeddings
for ``text_dropout`` of the samples, the original becomes a black image for ``image_dropout``.

Only peft LoRA adapters on the transformer train (``method: lora``; ``lora.target_modules``); the VAE and
both text encoders stay frozen. :meth:`FluxKontextModel.save_weights` writes ``lora/`` in diffusers'
format, which the ``flux_kontext`` editor loads through ``stage2.flux_kontext.weights=<checkpoint>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from u2s.finetune.config import FinetuneConfig
    from u2s.finetune.models.ip2p import PairBatch

LORA_DIR = "lora"
#: FLUX's distilled guidance during training (the diffusers FLUX LoRA scripts' default).
TRAIN_GUIDANCE = 3.5
#: T5 tokens per prompt: the pipeline's default, so the adapter sees the editor's text layout.
MAX_SEQUENCE_LENGTH = 512


class FluxKontextModel:
    """The FLUX Kontext pipeline's parts set up for LoRA training under ``cfg``.

    ``unet`` is the trained denoiser (the transformer): the train loop wraps and calls it by that name.
    """

    def __init__(self, cfg: FinetuneConfig, device: str = "cpu") -> None:
        import torch
        from diffusers import FluxKontextPipeline

        from u2s.io.model_store import local_model
        from u2s.log_privacy import silence_input_echo

        if cfg.method != "lora":
            raise ValueError("flux_kontext trains a LoRA: set method: lora")
        silence_input_echo()
        self.cfg = cfg
        self.device = torch.device(device)
        assert cfg.model is not None
        model = local_model(cfg.model, cfg.storage)
        self.pipe = FluxKontextPipeline.from_pretrained(
            model.model, revision=model.revision, dtype=torch.float32
        )
        self.pipe.set_progress_bar_config(disable=True)
        for frozen in (
            self.pipe.vae,
            self.pipe.text_encoder,
            self.pipe.text_encoder_2,
            self.pipe.transformer,
        ):
            frozen.requires_grad_(False)
        self.pipe.to(self.device)
        self.vae, self.transformer = self.pipe.vae, self.pipe.transformer
        self.vae.eval()
        self.transformer.add_adapter(cfg.lora.peft_config())
        if cfg.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.transformer.train()
        self.unet = self.transformer
        self.scheduler = self.pipe.scheduler
        with torch.no_grad():
            self.empty = self.encode_texts([""])
        self._black: dict[tuple[int, ...], torch.Tensor] = {}

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The LoRA parameters, in a fixed order."""
        return [p for p in self.transformer.parameters() if p.requires_grad]

    def encode_texts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 prompt embeddings (B, L, D), pooled CLIP embeddings (B, P)) as the pipeline encodes them."""
        embeds, pooled, _ = self.pipe.encode_prompt(
            texts, prompt_2=None, device=self.device, max_sequence_length=MAX_SEQUENCE_LENGTH
        )
        return embeds, pooled

    def conditioning(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformer's text condition per sample: the edit instruction's (embeddings, pooled)."""
        return self.encode_texts(batch.edit_instruction)

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """VAE latents of images in [-1, 1], shifted and scaled as the transformer sees them; a sample of
        the latent distribution under ``generator``, its mode without one."""
        dist = self.vae.encode(pixels.to(self.device)).latent_dist
        latents = dist.sample(generator=generator) if generator is not None else dist.mode()
        return (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor

    def black_latents(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The latent of a black image of latent shape ``shape`` (C, h, w): the dropped-image condition."""
        import torch

        if shape not in self._black:
            _, h, w = shape
            scale = self.pipe.vae_scale_factor
            vae = self.pipe.vae  # the real VAE, also while a latent cache stands in for `self.vae`
            with torch.no_grad():
                black = torch.full((1, 3, h * scale, w * scale), -1.0, device=self.device)
                latent = vae.encode(black).latent_dist.mode()
                self._black[shape] = ((latent - vae.config.shift_factor) * vae.config.scaling_factor)[0]
        return self._black[shape]

    def loss(
        self, unet: Any, batch: PairBatch, generator: torch.Generator, dropout: bool = True
    ) -> torch.Tensor:
        """The flow-matching loss of one micro-batch with ``unet`` (the transformer or its DDP wrapper).

        ``generator`` (on CPU) draws the latent sample, σ, noise and dropout: a fixed generator state
        gives a fixed loss for fixed weights. ``dropout``: the conditioning dropout applies.
        """
        import torch

        with torch.no_grad():
            target = self.encode_images(
                batch.edited, torch.Generator(self.device).manual_seed(_draw(generator))
            )
            condition = self.encode_images(batch.original)
            embeds, pooled = self.conditioning(batch)
        return self.flow_loss(unet, target, condition, embeds, pooled, generator, dropout)

    def flow_loss(
        self,
        unet: Any,
        target: torch.Tensor,
        condition: torch.Tensor,
        embeds: torch.Tensor,
        pooled: torch.Tensor,
        generator: torch.Generator,
        dropout: bool = True,
    ) -> torch.Tensor:
        """The loss from latents and text embeddings (what :meth:`loss` encodes, or a latent cache holds)."""
        import torch
        from diffusers import FluxKontextPipeline

        cfg = self.cfg
        bsz, channels, h, w = target.shape
        target, condition = target.to(self.device), condition.to(self.device)
        embeds, pooled = embeds.to(self.device), pooled.to(self.device)
        noise = torch.randn(target.shape, generator=generator).to(self.device)
        steps = len(self.scheduler.timesteps)
        index = (torch.rand(bsz, generator=generator) * steps).long().clamp(max=steps - 1)
        timesteps = self.scheduler.timesteps[index].to(self.device)
        sigmas = self.scheduler.sigmas[index].to(self.device, target.dtype).view(bsz, 1, 1, 1)
        noisy = (1.0 - sigmas) * target + sigmas * noise

        u = torch.rand(bsz, generator=generator).to(self.device)
        if not dropout:
            u = torch.full_like(u, 2.0)  # above every dropout band
        drop_text = u < cfg.text_dropout
        empty_embeds, empty_pooled = self.empty
        embeds = torch.where(drop_text.view(bsz, 1, 1), empty_embeds.to(embeds.dtype), embeds)
        pooled = torch.where(drop_text.view(bsz, 1), empty_pooled.to(pooled.dtype), pooled)
        low = cfg.text_dropout - cfg.both_dropout
        drop_image = ((u >= low) & (u < low + cfg.image_dropout)).view(bsz, 1, 1, 1)
        condition = torch.where(
            drop_image, self.black_latents((channels, h, w)).to(condition.dtype), condition
        )

        pack = FluxKontextPipeline._pack_latents
        packed = pack(noisy, bsz, channels, h, w)
        ids = FluxKontextPipeline._prepare_latent_image_ids(bsz, h // 2, w // 2, self.device, target.dtype)
        condition_ids = ids.clone()
        condition_ids[..., 0] = 1  # the context image's position ids, as the pipeline marks them
        text_ids = torch.zeros(embeds.shape[1], 3, device=self.device, dtype=target.dtype)
        guidance = torch.full((bsz,), TRAIN_GUIDANCE, device=self.device) if self.guidance_embeds else None
        prediction = unet(
            hidden_states=torch.cat([packed, pack(condition, bsz, channels, h, w)], dim=1),
            timestep=timesteps / 1000,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=torch.cat([ids, condition_ids], dim=0),
            return_dict=False,
        )[0][:, : packed.shape[1]]
        scale = self.pipe.vae_scale_factor
        prediction = FluxKontextPipeline._unpack_latents(prediction, h * scale, w * scale, scale)
        return torch.nn.functional.mse_loss(prediction.float(), (noise - target).float(), reduction="mean")

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)

    # ------------------------------------------------------------------------------------- weights

    def save_weights(self, folder: str | Path) -> Path:
        """Write the LoRA adapters (their current values) to ``folder/lora`` in diffusers' format."""
        from diffusers import FluxKontextPipeline
        from peft.utils import get_peft_model_state_dict

        folder = Path(folder)
        layers = get_peft_model_state_dict(self.transformer)
        FluxKontextPipeline.save_lora_weights(
            folder / LORA_DIR,
            transformer_lora_layers={k: v.detach().to("cpu").contiguous() for k, v in layers.items()},
            safe_serialization=True,
        )
        return folder

    @staticmethod
    def editor_settings(folder: str | Path) -> dict[str, Any]:
        """The ``stage2.flux_kontext`` fields that load the weights :meth:`save_weights` wrote."""
        return {"weights": str(folder)}


def _draw(generator: torch.Generator) -> int:
    """A 63-bit seed drawn from ``generator`` (for a stream on the model's device)."""
    import torch

    return int(torch.randint(0, 2**62, (1,), generator=generator))

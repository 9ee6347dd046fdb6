"""The InstructPix2Pix-family training step: plain IP2P and IP2P + SafeAttention (PAPER.md §3.3).

As diffusers' ``examples/instruct_pix2pix/train_instruct_pix2pix.py``: the edited image's VAE latent is
noised at a random DDPM timestep, the original's latent (its mode) is concatenated on the channel axis
(the UNet's 8 input channels), and the UNet predicts the noise (or ``v``) under an MSE loss. Conditioning
dropout: the texts become the empty-string embedding for ``text_dropout`` of the samples, the original
latent is zeroed for ``image_dropout``, overlapping on ``both_dropout``. SafeAttention's context is
``[c_p ; c_e]`` (public caption, edit instruction), both halves empty under text dropout.

What trains (:meth:`IP2PModel.trainable_parameters`): method ``full``, every UNet weight (SafeAttention's
included); method ``lora``, peft adapters on the UNet's attention plus SafeAttention's weights; with
``train_unet: false`` (safe_attention) only SafeAttention's weights. The VAE and text encoder stay frozen.

:meth:`IP2PModel.save_weights` writes what the editors load from ``stage2.<editor>.weights``:
``safe_attention.safetensors`` + ``safe_attention.json`` (SafeAttention), ``unet/`` (a full UNet folder
without SafeAttention's processors) and ``lora/`` (diffusers LoRA weights, ``load_lora_weights``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from u2s.finetune.config import FinetuneConfig

UNET_DIR = "unet"
LORA_DIR = "lora"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


@dataclass
class PairBatch:
    """One micro-batch of training pairs: images (B, 3, H, W) in [-1, 1] and their texts (private)."""

    original: torch.Tensor
    edited: torch.Tensor
    edit_instruction: list[str]
    public_caption: list[str]


class IP2PModel:
    """The IP2P pipeline's parts set up for training under ``cfg`` (editor, method, SafeAttention)."""

    def __init__(self, cfg: FinetuneConfig, device: str = "cpu") -> None:
        import torch
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        from u2s.io.model_store import local_model
        from u2s.log_privacy import silence_input_echo

        silence_input_echo()
        self.cfg = cfg
        self.device = torch.device(device)
        assert cfg.model is not None
        model = local_model(cfg.model, cfg.storage)
        load = {"revision": model.revision}
        self.tokenizer = AutoTokenizer.from_pretrained(model.model, subfolder="tokenizer", **load)
        self.text_encoder = CLIPTextModel.from_pretrained(model.model, subfolder="text_encoder", **load)
        self.vae = AutoencoderKL.from_pretrained(model.model, subfolder="vae", **load)
        self.unet = UNet2DConditionModel.from_pretrained(model.model, subfolder="unet", **load)
        for frozen in (self.vae, self.text_encoder):
            frozen.requires_grad_(False)
            frozen.eval().to(self.device)
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=cfg.num_train_timesteps,
            beta_start=cfg.beta_start,
            beta_end=cfg.beta_end,
            beta_schedule=cfg.beta_schedule,
            prediction_type=self._prediction_type(model.model, load),
        )
        self.safe_attention = cfg.editor == "safe_attention"
        self.unet.requires_grad_(cfg.method == "full" and (cfg.train_unet or not self.safe_attention))
        if cfg.method == "lora" and (cfg.train_unet or not self.safe_attention):
            self.unet.add_adapter(cfg.lora.peft_config())
        if self.safe_attention:
            from u2s.stage2.safe_attention_processor import install_safe_attention

            for proc in install_safe_attention(self.unet, cfg.safe_attention_variant).values():
                proc.requires_grad_(True)
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.unet.to(self.device).train()
        with torch.no_grad():
            self.empty = self.encode_texts([""])  # (1, 77, D): the dropped-text condition

    @staticmethod
    def _prediction_type(model: str, load: dict[str, Any]) -> str:
        """The base model's prediction type (epsilon unless its scheduler says otherwise)."""
        from diffusers import DDPMScheduler

        try:
            return DDPMScheduler.from_pretrained(model, subfolder="scheduler", **load).config.prediction_type
        except (OSError, ValueError):
            return "epsilon"

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the optimizer updates (and the EMA follows), in a fixed order."""
        return [p for p in self.unet.parameters() if p.requires_grad]

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """CLIP-encode ``texts`` as the IP2P pipeline does (77 tokens, padded/truncated): (B, 77, D)."""
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return self.text_encoder(tokens.input_ids.to(self.device))[0]

    def conditioning(self, batch: PairBatch) -> torch.Tensor:
        """The UNet's context per sample: ``c_e`` (IP2P) or ``[c_p ; c_e]`` (SafeAttention)."""
        import torch

        with torch.no_grad():
            edit = self.encode_texts(batch.edit_instruction)
            if not self.safe_attention:
                return edit
            return torch.cat([self.encode_texts(batch.public_caption), edit], dim=1)

    def loss(
        self, unet: Any, batch: PairBatch, generator: torch.Generator, dropout: bool = True
    ) -> torch.Tensor:
        """The denoising loss of one micro-batch with ``unet`` (the model itself or its DDP wrapper).

        ``generator`` (on CPU) draws the latent sample, timesteps, noise and dropout: a fixed generator
        state gives a fixed loss for fixed weights. ``dropout``: the conditioning dropout applies.
        """
        import torch
        import torch.nn.functional as F

        cfg = self.cfg
        original = batch.original.to(self.device)
        edited = batch.edited.to(self.device)
        bsz = edited.shape[0]
        with torch.no_grad():
            scale = self.vae.config.scaling_factor
            latents = self.vae.encode(edited).latent_dist.sample(generator=generator) * scale
            image_latents = self.vae.encode(original).latent_dist.mode()
            context = self.conditioning(batch)
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (bsz,), generator=generator).to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)

        u = torch.rand(bsz, generator=generator).to(self.device)
        if not dropout:
            u = torch.full_like(u, 2.0)  # above every dropout band
        drop_text = (u < cfg.text_dropout).view(bsz, 1, 1)
        empty = self.empty.repeat(1, context.shape[1] // self.empty.shape[1], 1)
        context = torch.where(drop_text, empty.to(context.dtype), context)
        low = cfg.text_dropout - cfg.both_dropout
        drop_image = ((u >= low) & (u < low + cfg.image_dropout)).view(bsz, 1, 1, 1)
        image_latents = image_latents * (~drop_image).to(image_latents.dtype)

        model_input = torch.cat([noisy, image_latents], dim=1)
        prediction = unet(model_input, timesteps, context, return_dict=False)[0]
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return F.mse_loss(prediction.float(), target.float(), reduction="mean")

    # ------------------------------------------------------------------------------------- weights

    def save_weights(self, folder: str | Path) -> Path:
        """Write the trained weights (the UNet's current values) where the editor loads them from."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.safe_attention:
            from u2s.stage2.safe_attention_processor import save_safe_attention

            save_safe_attention(self.unet, folder)
        if self.cfg.method == "lora" and (self.cfg.train_unet or not self.safe_attention):
            save_lora(self.unet, folder / LORA_DIR)
        elif self.cfg.method == "full" and (self.cfg.train_unet or not self.safe_attention):
            save_unet(self.unet, folder / UNET_DIR)
        return folder

    def pipeline(self) -> Any:
        """A `StableDiffusionInstructPix2PixPipeline` sharing this model's (current) weights."""
        from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

        scheduler = EulerAncestralDiscreteScheduler.from_config(self.noise_scheduler.config)
        pipe = StableDiffusionInstructPix2PixPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        return pipe


def _base_state_dict(unet: Any) -> dict[str, Any]:
    """The UNet's own weights: no SafeAttention processor weights, no LoRA adapters."""
    state = {}
    for key, value in unet.state_dict().items():
        if ".processor." in key or "lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value.detach().to("cpu").contiguous()
    return state


def save_unet(unet: Any, folder: str | Path) -> Path:
    """A full UNet folder (`UNet2DConditionModel.from_pretrained` loads it) without SafeAttention's or
    LoRA's extra weights."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_config(folder)
    save_file(_base_state_dict(unet), str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def save_lora(unet: Any, folder: str | Path) -> Path:
    """The UNet's LoRA adapters in diffusers' format (``pipe.load_lora_weights(folder)`` loads them)."""
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    folder = Path(folder)
    StableDiffusionInstructPix2PixPipeline.save_lora_weights(
        folder, unet_lora_layers={k: v.detach().to("cpu").contiguous() for k, v in layers.items()},
        safe_serialization=True,
    )  # fmt: skip
    return folder

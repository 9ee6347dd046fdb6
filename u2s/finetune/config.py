"""``u2s finetune`` settings: which runs' pairs, which editor and method, the recipe (PAPER.md §3.3).

Defaults are the paper's: lr 1e-5 with LambdaLinear (no warm-up), batch 64 × accumulation 4, EMA, the
10% / 10% / 5% conditioning dropout, the 1000-step DDPM schedule (β 0.00085 → 0.012), 256 px pairs with
a joint horizontal flip, the CLIP-ratio filter at 0.7. Load one with :func:`load_finetune_config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from u2s.config import Resources, StorageConfig
from u2s.config_base import ConfigModel, ModelConfig, absolute_path, model_location
from u2s.eval.config import EvalModels, MetricName

EDITORS = ("safe_attention", "instruct_pix2pix", "flux_kontext")


class RunSource(ConfigModel):
    """The two tables of one ``u2s run`` (and where its originals are)."""

    safe: str = Field(
        ..., description="The run's safe table (edited images): a folder of Parquet, local or s3://."
    )
    sensitive: str = Field(
        ...,
        description="The run's sensitive table (public caption, edit instruction, source): local or s3://.",
    )
    original: str | None = Field(
        None, description="Root the sensitive table's `source` paths are relative to. None: `source` is "
        "the original's full location (what u2s writes for image folders and URL lists).",
    )  # fmt: skip

    _absolute = field_validator("safe", "sensitive", "original")(absolute_path)


class LoraSettings(ConfigModel):
    """LoRA adapters (peft) on the UNet's attention projections, when ``method: lora``."""

    rank: int = Field(16, ge=1, description="LoRA rank r (the paper's FLUX LoRA: 16).")
    alpha: int = Field(16, ge=1, description="LoRA alpha (scale alpha / r; the paper's FLUX LoRA: 16).")
    target_modules: list[str] = Field(
        ["to_q", "to_k", "to_v", "to_out.0"],
        description="Module names (suffixes) that get adapters. SafeAttention's own projections "
        "(`to_k_public`...) are not matched: they train fully.",
    )
    init: Literal["gaussian", "default"] = Field(
        "gaussian", description="peft `init_lora_weights`: gaussian (the paper) or peft's default."
    )

    def peft_config(self) -> Any:
        """These settings as peft's ``LoraConfig`` (for ``model.add_adapter``)."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            init_lora_weights="gaussian" if self.init == "gaussian" else True,
            target_modules=self.target_modules,
        )


class ValidationSettings(ConfigModel):
    """What each validation computes: the val rows edited through the editor, scored by the eval suite."""

    metrics: list[MetricName] = Field(
        ["face_sim", "text_sim", "clip_direction", "clip_text", "ssim"],
        description="Eval-suite metrics of each validation edit against its original (`u2s eval`'s names); "
        "`ssim_target` (the edit against the run's edited image) is always added.",
    )  # fmt: skip
    models: EvalModels = Field(
        default_factory=EvalModels, description="The metrics' models, as `u2s eval`'s `models` section."
    )
    num_inference_steps: int | None = Field(
        None, ge=1, description="Denoising steps of the validation edits. None: the editor's default."
    )
    edit: bool = Field(
        True, description="Edit the val rows and score them (false: only the val denoising loss)."
    )


class FinetuneConfig(ConfigModel):
    """One fine-tuning job: pairs from earlier runs, the editor to train, the recipe, where checkpoints go."""

    runs: list[RunSource] = Field(..., min_length=1, description="The u2s runs whose pairs train the editor.")
    editor: Literal["safe_attention", "instruct_pix2pix", "flux_kontext"] = Field(
        "safe_attention",
        description="Editor to fine-tune; its checkpoint loads through `stage2.<editor>.weights`.",
    )
    method: Literal["full", "lora"] = Field(
        "full", description="full: every UNet weight trains (the paper); lora: peft adapters on the UNet's "
        "attention (`lora`). SafeAttention's own weights train fully either way.",
    )  # fmt: skip
    model: ModelConfig | None = Field(
        None, description="Base pipeline to fine-tune. None: the `paper` preset's `stage2.<editor>.model`."
    )
    safe_attention_variant: Literal["gated", "fusion"] = Field(
        "gated",
        description="SafeAttention variant (editor safe_attention): as `stage2.safe_attention.variant`.",
    )
    train_unet: bool = Field(
        True, description="safe_attention: also train the UNet (full or LoRA by `method`; the paper: full "
        "UNet). False: only the SafeAttention weights train.",
    )  # fmt: skip
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA settings (method lora).")
    resolution: int = Field(
        256, ge=8, description="Training side: resize short side, crop a square (paper: 256)."
    )
    random_flip: float = Field(
        0.5, ge=0, le=1, description="Probability of a horizontal flip, the same for original and edited."
    )
    clip_ratio_threshold: float | None = Field(
        0.7, ge=0, description="Keep a pair when CLIP(edited, public caption) / CLIP(original, public "
        "caption) exceeds this (the paper: 0.7). None: no filter (no CLIP model loads).",
    )  # fmt: skip
    clip_model: ModelConfig = Field(
        default_factory=lambda: ModelConfig(model="openai/clip-vit-large-patch14"),
        description="CLIP for the ratio filter (the eval suite's `models.clip`; the paper: ViT-L/14).",
    )
    val_fraction: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="Share of pairs held out for validation, chosen by a hash of id and seed.",
    )
    seed: int = Field(
        42, ge=0, description="Seed of the split, the flips, noise and dropout draws (paper: 42)."
    )
    # Optimisation (PAPER.md §3.3).
    learning_rate: float = Field(1e-5, gt=0, description="Peak learning rate (the paper: 1e-5).")
    lr_warmup_steps: int = Field(
        0, ge=0, description="LambdaLinear warm-up steps from `lr_start_factor` to 1 (the paper: none)."
    )
    lr_start_factor: float = Field(1e-6, ge=0, description="LambdaLinear f_start (the paper: 1e-6).")
    lr_end_factor: float = Field(
        1.0,
        ge=0,
        description="LambdaLinear factor reached at `max_steps`, linear after warm-up (1: constant).",
    )
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient-norm clip. None: no clipping.")
    batch_size: int = Field(64, ge=1, description="Pairs per worker per micro-batch (the paper: 64).")
    gradient_accumulation: int = Field(
        4, ge=1, description="Micro-batches per optimizer step (the paper: 4)."
    )
    use_ema: bool = Field(True, description="Keep an EMA of the trained weights; checkpoints hold the EMA.")
    ema_decay: float = Field(0.9999, gt=0, lt=1, description="EMA decay (diffusers EMAModel's default).")
    text_dropout: float = Field(
        0.10, ge=0, le=1, description="Share of samples whose texts become the empty-string embedding."
    )
    image_dropout: float = Field(
        0.10, ge=0, le=1, description="Share of samples whose original latent is zeroed."
    )
    both_dropout: float = Field(
        0.05, ge=0, le=1, description="Share of samples in both groups above (u < text: no text; "
        "text − both ≤ u < text − both + image: no image).",
    )  # fmt: skip
    num_train_timesteps: int = Field(1000, ge=1, description="DDPM training timesteps (the paper: 1000).")
    beta_start: float = Field(0.00085, gt=0, description="DDPM β at t=0.")
    beta_end: float = Field(0.012, gt=0, description="DDPM β at the last step.")
    beta_schedule: Literal["scaled_linear", "linear"] = Field(
        "scaled_linear", description="DDPM β schedule; ldm's `linear` is diffusers' scaled_linear."
    )
    # Length, checkpoints, validation.
    max_steps: int = Field(1000, ge=1, description="Optimizer steps to train.")
    checkpoint_every: int = Field(500, ge=1, description="Steps between checkpoints (and one at the end).")
    num_to_keep: int | None = Field(3, ge=1, description="Checkpoints kept in storage. None: all.")
    validate_every: int | None = Field(
        500, ge=1, description="Steps between validations on the val split. None: never."
    )
    max_val_rows: int = Field(16, ge=1, description="Val rows each validation uses (the first by id).")
    validation: ValidationSettings = Field(
        default_factory=ValidationSettings, description="Metrics, models and steps of each validation."
    )
    storage_path: str = Field(
        ..., description="Where Ray Train keeps checkpoints and results: local or s3://."
    )
    name: str = Field("u2s-finetune", description="Experiment name: the folder under `storage_path`.")
    max_failures: int = Field(
        3, ge=-1, description="Restarts from the latest checkpoint after a worker dies (-1: unlimited)."
    )
    # Hardware.
    ray_address: str | None = Field(
        None, description="Ray address; None: $RAY_ADDRESS, else a running `ray start` head, else a private "
        "local cluster.",
    )  # fmt: skip
    num_workers: int = Field(1, ge=1, description="Ray Train workers (one GPU each with `use_gpu`).")
    use_gpu: bool = Field(False, description="Train on GPUs (NCCL); else CPU (gloo).")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs each worker reserves.")
    torch_threads: int | None = Field(
        None, ge=1, description="torch threads per worker. None: torch's default."
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="Autocast dtype on GPU (trained weights stay float32)."
    )
    gradient_checkpointing: bool = Field(
        False, description="UNet gradient checkpointing (less memory, slower)."
    )
    precompute: bool = Field(
        False, description="Cache VAE latents and text embeddings of the pairs in object storage and train "
        "on them (the VAE and text encoder then do not run per step).",
    )  # fmt: skip
    data: Resources = Field(
        default_factory=lambda: Resources(batch_size=16, num_cpus=0.2),
        description="Ray Data resources of the pair pipeline (reads, fetches, CLIP filter).",
    )
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Object storage endpoint.")

    @field_validator("storage_path")
    @classmethod
    def _storage_location(cls, value: str) -> str:
        return model_location(value) or value

    @model_validator(mode="after")
    def _fill_model(self) -> FinetuneConfig:
        if self.model is None:
            from u2s.config import preset_text

            section = (yaml.safe_load(preset_text("paper")) or {})["stage2"][self.editor]
            object.__setattr__(self, "model", ModelConfig.model_validate(section["model"]))
        if self.both_dropout > min(self.text_dropout, self.image_dropout):
            raise ValueError("both_dropout must not exceed text_dropout or image_dropout")
        return self

    @property
    def experiment_uri(self) -> str:
        """Where this experiment's checkpoints live: ``storage_path/name``."""
        return f"{self.storage_path.rstrip('/')}/{self.name}"


def load_finetune_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> FinetuneConfig:
    """A YAML file, then ``key.path=value`` overrides (values parsed as YAML), validated."""
    from u2s.config import apply_overrides, read_yaml_mapping, validate_config

    tree: dict[str, Any] = read_yaml_mapping(path) if path else {}
    return validate_config(FinetuneConfig, apply_overrides(tree, overrides))

"""The image classifier of the utility evaluation and how it is trained (the paper's settings by default)."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ClassifierConfig(_Model):
    """The classifier and how it is trained (the paper's settings by default)."""

    model: str = Field(
        "facebook/vit-mae-base",
        description="Hugging Face id or local path of a transformers image model. Its head is replaced by a "
        "new linear layer over the dataset's classes.",
    )
    revision: str | None = Field(None, description="HF revision (branch, tag or commit).")
    model_class: str | None = Field(
        None,
        description="transformers class to load, e.g. ViTForImageClassification. None: "
        "AutoModelForImageClassification, or the class in MODEL_CLASS_FALLBACKS for checkpoint types "
        "that have none (MAE's vit_mae loads into ViTForImageClassification).",
    )
    head: str = Field(
        "classifier", description="Attribute holding the classification head (re-initialised, seeded)."
    )
    mode: Literal["finetune", "linear_probe"] = Field(
        "finetune",
        description="finetune: train every weight (the paper's settings are MAE's fine-tuning recipe); "
        "linear_probe: freeze the backbone, train only the head.",
    )
    image_size: int | None = Field(
        None, ge=8, description="Input side in pixels. None: the model's (224 for ViT-B/16, the paper's)."
    )
    crop_pct: float = Field(
        0.875, gt=0, le=1, description="Evaluation: resize the short side to image_size / crop_pct "
        "(256 for 224), then centre-crop image_size.",
    )  # fmt: skip
    image_mean: tuple[float, float, float] | None = Field(
        None, description="Normalization mean. None: the model's image processor's."
    )
    image_std: tuple[float, float, float] | None = Field(
        None, description="Normalization std. None: the model's image processor's."
    )
    epochs: int = Field(100, ge=1, description="Training epochs.")
    batch_size: int = Field(64, ge=1, description="Images per worker per step (also the eval batch).")
    accum_steps: int = Field(4, ge=1, description="Gradient accumulation steps per optimizer update.")
    base_lr: float = Field(
        5e-4, gt=0, description="Learning rate per 256 images (MAE's rule): lr = base_lr × batch_size × "
        "accum_steps × workers / 256; the paper's 64 × 4 on one GPU gives exactly 5e-4.",
    )  # fmt: skip
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (not on biases and norms).")
    warmup_epochs: float = Field(5.0, ge=0, description="Linear warm-up, then cosine decay to 0.")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="Cross-entropy label smoothing (MAE's).")
    crop_scale: tuple[float, float] = Field(
        (0.08, 1.0), description="RandomResizedCrop area range (fraction of the image)."
    )
    hflip: float = Field(0.5, ge=0, le=1, description="Probability of a horizontal flip.")
    randaugment_ops: int = Field(2, ge=0, description="RandAugment ops per image (0: off).")
    randaugment_magnitude: float = Field(9.0, ge=0, le=10, description="RandAugment magnitude (0-10).")
    randaugment_std: float = Field(0.5, ge=0, description="Std of the per-op magnitude noise.")
    precision: Literal["bf16", "fp32"] = Field(
        "bf16", description="bf16: autocast on GPU (fp32 weights and optimizer); CPU always runs fp32."
    )
    seed: int = Field(0, description="Seeds the head's initialisation (the same for every split).")

    @field_validator("model")
    @classmethod
    def _local_dir_absolute(cls, value: str) -> str:
        # An existing local folder wins over a hub id (as in `from_pretrained`); pin it for the workers.
        return os.path.abspath(value) if os.path.isdir(value) else value

    @field_validator("crop_scale")
    @classmethod
    def _scale_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1] <= 1:
            raise ValueError("crop_scale must be (low, high) with 0 < low <= high <= 1")
        return value

    def augment_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`u2s.eval.augment.train_transform`."""
        return {"scale": self.crop_scale, "hflip": self.hflip, "num_ops": self.randaugment_ops,
                "magnitude": self.randaugment_magnitude, "magnitude_std": self.randaugment_std}  # fmt: skip

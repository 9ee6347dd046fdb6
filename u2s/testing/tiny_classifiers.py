"""Tiny, randomly initialised image classifiers (ViT, and MAE's ViT as pretrained), built from configs.

Like :mod:`u2s.testing.tiny_models`: ordinary `save_pretrained` folders (model + image processor) that
the utility evaluation reads back with `from_pretrained`, exactly as it reads real checkpoints.
"""

from __future__ import annotations

from pathlib import Path

#: Input side of the tiny models (patch 8 → 16 patches).
TINY_IMAGE_SIZE = 32
_DIMS = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def _save_processor(out: Path) -> None:
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    processor = ViTImageProcessorPil(
        size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor.save_pretrained(out)


def build_tiny_vit_classifier(out: str | Path, seed: int = 0, num_labels: int = 2) -> Path:
    """A ``ViTForImageClassification`` (32 px, 2 layers, width 32) and its image processor."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    out = Path(out)
    torch.manual_seed(seed)
    config = ViTConfig(image_size=TINY_IMAGE_SIZE, patch_size=8, num_labels=num_labels, **_DIMS)
    ViTForImageClassification(config).save_pretrained(out)
    _save_processor(out)
    return out


def build_tiny_vit_mae(out: str | Path, seed: int = 0) -> Path:
    """A ``ViTMAEForPreTraining`` (MAE's checkpoint type, as ``facebook/vit-mae-base``) and its processor."""
    import torch
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    out = Path(out)
    torch.manual_seed(seed)
    config = ViTMAEConfig(image_size=TINY_IMAGE_SIZE, patch_size=8, decoder_hidden_size=16,
                          decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                          decoder_intermediate_size=32, **_DIMS)  # fmt: skip
    ViTMAEForPreTraining(config).save_pretrained(out)
    _save_processor(out)
    return out

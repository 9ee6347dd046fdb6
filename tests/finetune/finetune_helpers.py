"""Helpers of the fine-tuning tests: a small config over the tiny run, the cpu-tiny editors, PNG bytes."""

from __future__ import annotations

import io
from pathlib import Path


def png(img) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    return buffer.getvalue()


def tiny_editor(model: Path, editor: str = "instruct_pix2pix", endpoint: str | None = None, **fields):
    """The cpu-tiny preset's ``editor`` on ``model`` (``fields``: more ``stage2.<editor>`` settings;
    ``endpoint``: the S3 server s3:// weights are staged from)."""
    from u2s.config import load_config
    from u2s.stage2.editors import EDITORS

    overrides = [f"stage2.editor={editor}", f"stage2.{editor}.model.model={model}"]
    overrides += [f"stage2.{editor}.{key}={value}" for key, value in fields.items()]
    overrides += [f"storage.endpoint_url={endpoint}"] if endpoint else []
    cfg = load_config(preset="cpu-tiny", overrides=overrides)
    return EDITORS[editor](cfg.stage2, cfg.storage)


def finetune_config(run: dict, model: Path, storage_path: str, **fields):
    """A small FinetuneConfig over ``run`` (32 px, batch 2, no CLIP filter unless given)."""
    from u2s.finetune.config import FinetuneConfig

    base = {
        "runs": [{"safe": run["safe"], "sensitive": run["sensitive"]}],
        "model": {"model": str(model), "dtype": "float32", "device": "cpu"},
        "storage_path": storage_path, "storage": run["storage"], "resolution": 32, "batch_size": 2,
        "gradient_accumulation": 1, "clip_ratio_threshold": None, "val_fraction": 0.2, "torch_threads": 1,
        "data": {"batch_size": 4, "num_cpus": 0.1},
    }  # fmt: skip
    return FinetuneConfig.model_validate({**base, **fields})

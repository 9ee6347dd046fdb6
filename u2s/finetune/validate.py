"""Validation during fine-tuning: figures on the val split with the current (EMA) weights.

:func:`validate` is called on rank 0 every ``validate_every`` steps; its figures join Ray Train's
reported metrics (prefixed ``val_``). Today it reports the denoising loss on the val rows under a fixed
random stream (timesteps, noise, no dropout draws change between calls), so successive values compare.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from u2s.finetune.config import FinetuneConfig
    from u2s.finetune.models.ip2p import IP2PModel


def validate(model: IP2PModel, val_rows: list[dict], cfg: FinetuneConfig, step: int) -> dict[str, float]:
    """Figures of ``model`` (its current weights) on ``val_rows`` (pair rows, as the train loop reads
    them) at ``step``: ``{"val_loss": ...}``; empty when there are no val rows."""
    import torch

    from u2s.finetune.train_loop import collate

    if not val_rows:
        return {}
    generator = torch.Generator().manual_seed(cfg.seed)
    losses = []
    with torch.no_grad():
        for start in range(0, len(val_rows), cfg.batch_size):
            rows = val_rows[start : start + cfg.batch_size]
            batch = collate(rows, cfg, generator=None)
            losses.append(float(model.loss(model.unet, batch, generator, dropout=False)) * len(rows))
    return {"val_loss": sum(losses) / len(val_rows)}

"""The per-worker training loop that Ray Train's ``TorchTrainer`` runs (``train_loop_per_worker``).

Each worker reads its shard of the ``train`` dataset (pair rows from :mod:`u2s.finetune.data`), turns
micro-batches into tensors (:func:`collate`: short side resized to ``resolution``, one crop and one
horizontal flip shared by the original and the edited image), accumulates gradients over
``gradient_accumulation`` micro-batches, steps AdamW under the LambdaLinear schedule and updates the EMA.

Every ``checkpoint_every`` steps and at the last one, rank 0 writes a checkpoint: the EMA weights in the
layout the editor loads (:meth:`~u2s.finetune.models.ip2p.IP2PModel.save_weights`), ``finetune.json``
(editor, method, step) and ``training_state.pt`` (raw weights, optimizer, schedule, EMA, step, epoch and
the micro-batches consumed in that epoch). A restarted worker group resumes from the latest one
(``ray.train.get_checkpoint()``), skipping the micro-batches its epoch had already consumed.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from u2s.finetune.config import FinetuneConfig
    from u2s.finetune.models.ip2p import PairBatch

STATE_NAME = "training_state.pt"
META_NAME = "finetune.json"
FORMAT_VERSION = 1


def _image_tensor(data: bytes, side: int, crop: tuple[int, int], flip: bool) -> torch.Tensor:
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    scale = side / min(img.size)
    size = (max(side, round(img.width * scale)), max(side, round(img.height * scale)))
    img = img.resize(size, Image.Resampling.BICUBIC)
    left, top = round(crop[0] * (size[0] - side)), round(crop[1] * (size[1] - side))
    img = img.crop((left, top, left + side, top + side))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
    return array / 127.5 - 1.0


def collate(rows: list[dict[str, Any]], cfg: FinetuneConfig, generator: torch.Generator | None) -> PairBatch:
    """Pair rows → a :class:`PairBatch` at ``cfg.resolution``: short side resized, a square crop and a
    horizontal flip drawn once per pair from ``generator`` and applied to both images (``None``: centre
    crop, no flip). The edited image is resized to the original's size first, so one crop fits both."""
    import torch
    from PIL import Image

    from u2s.finetune.models.ip2p import PairBatch

    originals, edits = [], []
    for row in rows:
        if generator is None:
            crop, flip = (0.5, 0.5), False
        else:
            draws = torch.rand(3, generator=generator).tolist()
            crop, flip = (draws[0], draws[1]), draws[2] < cfg.random_flip
        original = Image.open(io.BytesIO(row["original"]))
        edited = Image.open(io.BytesIO(row["edited"]))
        edited_bytes = row["edited"]
        if edited.size != original.size:
            buffer = io.BytesIO()
            edited.convert("RGB").resize(original.size, Image.Resampling.BICUBIC).save(buffer, "PNG")
            edited_bytes = buffer.getvalue()
        originals.append(_image_tensor(row["original"], cfg.resolution, crop, flip))
        edits.append(_image_tensor(edited_bytes, cfg.resolution, crop, flip))
    return PairBatch(
        original=torch.stack(originals),
        edited=torch.stack(edits),
        edit_instruction=[str(r["edit_instruction"] or "") for r in rows],
        public_caption=[str(r["public_caption"] or "") for r in rows],
    )


def lambda_linear(cfg: FinetuneConfig):
    """The LambdaLinear factor by step: ``lr_start_factor`` → 1 over the warm-up, then linear to
    ``lr_end_factor`` at ``max_steps``."""

    def factor(step: int) -> float:
        if step < cfg.lr_warmup_steps:
            return cfg.lr_start_factor + (1.0 - cfg.lr_start_factor) * step / cfg.lr_warmup_steps
        span = max(1, cfg.max_steps - cfg.lr_warmup_steps)
        return 1.0 + (cfg.lr_end_factor - 1.0) * min(1.0, (step - cfg.lr_warmup_steps) / span)

    return factor


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (the run seed, step, rank...): independent streams per position."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _rows(batch: dict[str, Any]) -> list[dict[str, Any]]:
    keys = list(batch)
    return [dict(zip(keys, values, strict=True)) for values in zip(*(batch[k] for k in keys), strict=True)]


def read_meta(folder: str | Path) -> dict[str, Any]:
    """A checkpoint's ``finetune.json`` (editor, method, variant, step)."""
    return json.loads((Path(folder) / META_NAME).read_text())


class _Trainer:
    """One worker's model, optimizer, schedule, EMA and position (what a checkpoint holds)."""

    def __init__(self, cfg: FinetuneConfig) -> None:
        import ray.train
        import ray.train.torch
        import torch

        if cfg.editor == "flux_kontext":
            from u2s.finetune.models.flux_kontext import FluxKontextModel as Model
        else:
            from u2s.finetune.models.ip2p import IP2PModel as Model

        self.cfg = cfg
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.device = ray.train.torch.get_device()
        torch.manual_seed(cfg.seed)  # the same initial weights (LoRA, SafeAttention) on every worker
        self.model = Model(cfg, str(self.device))
        self.params = self.model.trainable_parameters()
        if not self.params:
            raise ValueError("nothing to train: the config freezes every weight")
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.weight_decay, eps=cfg.adam_epsilon,
        )  # fmt: skip
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda_linear(cfg))
        self.ema = None
        if cfg.use_ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.params, decay=cfg.ema_decay)
        self.step = self.epoch = self.position = 0
        self.resumed_from = 0
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                self._load(Path(folder) / STATE_NAME)
            self.resumed_from = self.step
        fp16 = cfg.mixed_precision == "fp16" and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision)
        self.unet = self.model.unet
        if self.world > 1:
            self.unet = ray.train.torch.prepare_model(
                self.model.unet, parallel_strategy_kwargs={"find_unused_parameters": cfg.method == "lora"}
            )

    def _load(self, path: Path) -> None:
        import torch

        state = torch.load(path, map_location="cpu", weights_only=False)
        with torch.no_grad():
            for param, value in zip(self.params, state["params"], strict=True):
                param.copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]

    def save(self, folder: Path) -> None:
        """Write a checkpoint into ``folder``: EMA weights for the editor, the training state."""
        import torch

        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)
        try:
            self.model.save_weights(folder)
        finally:
            if self.ema is not None:
                self.ema.restore(self.params)
        cfg = self.cfg
        meta = {
            "format": FORMAT_VERSION, "editor": cfg.editor, "method": cfg.method, "step": self.step,
            "safe_attention_variant": cfg.safe_attention_variant if cfg.editor == "safe_attention" else None,
            "base_model": cfg.model.model if cfg.model else None, "ema": self.ema is not None,
        }  # fmt: skip
        (folder / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        torch.save(
            {
                "params": [p.detach().to("cpu") for p in self.params],
                "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "step": self.step, "epoch": self.epoch, "position": self.position,
            },
            folder / STATE_NAME,
        )  # fmt: skip

    def micro_loss(self, rows: list[dict[str, Any]], micro: int) -> torch.Tensor:
        import torch

        generator = torch.Generator().manual_seed(_seed(self.cfg.seed, self.step, micro, self.rank))
        enabled = self.autocast_dtype is not None and self.device.type == "cuda"
        if self.cfg.precompute:  # rows of the latent cache (u2s.finetune.latents)
            from u2s.finetune.latents import cached_loss

            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=enabled):
                return cached_loss(self.model, self.unet, rows, generator)
        batch = collate(rows, self.cfg, generator)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=enabled):
            return self.model.loss(self.unet, batch, generator)

    def optimizer_step(self) -> None:
        import torch

        if self.cfg.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.params)
        self.step += 1


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function; ``config["finetune"]`` is the dumped :class:`FinetuneConfig`."""
    import contextlib

    import ray.train

    from u2s.finetune.config import FinetuneConfig
    from u2s.finetune.validate import validate

    cfg = FinetuneConfig.model_validate(config["finetune"])
    t = _Trainer(cfg)
    val_rows: list[dict[str, Any]] = []
    if t.rank == 0 and cfg.validate_every:
        for row in ray.train.get_dataset_shard("val").iter_rows():
            val_rows.append(dict(row))
            if len(val_rows) >= cfg.max_val_rows:
                break
    shard = ray.train.get_dataset_shard("train")
    accum, micro, running = cfg.gradient_accumulation, 0, 0.0
    while t.step < cfg.max_steps:
        seen = 0
        batches = shard.iter_batches(
            batch_size=cfg.batch_size, batch_format="numpy", drop_last=True,
            local_shuffle_buffer_size=4 * cfg.batch_size, local_shuffle_seed=_seed(cfg.seed, t.epoch, t.rank),
        )  # fmt: skip
        for index, batch in enumerate(batches):
            seen += 1
            if index < t.position:
                continue  # consumed before the checkpoint this attempt resumed from
            last = micro == accum - 1
            sync = contextlib.nullcontext() if last or t.world == 1 else t.unet.no_sync()
            with sync:
                loss = t.micro_loss(_rows(batch), micro)
                t.scaler.scale(loss / accum).backward()
            running += float(loss.detach()) / accum
            t.position, micro = index + 1, micro + 1
            if micro < accum:
                continue
            t.optimizer_step()
            metrics = {"step": t.step, "loss": running, "lr": t.schedule.get_last_lr()[0],
                       "epoch": t.epoch, "resumed_from_step": t.resumed_from}  # fmt: skip
            micro, running = 0, 0.0
            if cfg.validate_every and t.step % cfg.validate_every == 0 and t.rank == 0:
                check = functools.partial(validate, t.model, val_rows, cfg, t.step, collate)
                metrics.update(_with_ema(t, check))
            if t.step % cfg.checkpoint_every == 0 or t.step >= cfg.max_steps:
                _report_checkpoint(t, metrics)
            else:
                ray.train.report(metrics)
            if t.step >= cfg.max_steps:
                break
        if seen == 0:
            raise ValueError("a training shard has no full batch: fewer pairs than batch_size × workers")
        if t.step < cfg.max_steps:
            t.epoch, t.position = t.epoch + 1, 0


def _with_ema(t: _Trainer, fn: Callable[[], dict[str, float]]) -> dict[str, float]:
    """``fn()`` run with the EMA weights in place of the raw ones."""
    if t.ema is None:
        return fn()
    t.ema.store(t.params)
    t.ema.copy_to(t.params)
    try:
        return fn()
    finally:
        t.ema.restore(t.params)


def _report_checkpoint(t: _Trainer, metrics: dict[str, Any]) -> None:
    import ray.train
    from ray.train import Checkpoint

    if t.rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="u2s-ckpt-") as tmp:
        t.save(Path(tmp))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))

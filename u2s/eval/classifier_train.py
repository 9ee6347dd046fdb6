"""Train and test one image classifier on Ray Train (``TorchTrainer``), data parallel over workers.

The training split reaches each worker as a Ray Data shard of augmented uint8 pixels (``equal`` split,
so every worker runs the same number of steps under DDP); the test split is split without dropping a
row, each worker scores its share and the counts are summed, so top-1 covers every test image exactly
once. Normalization runs on the worker's device. Imported only when an evaluation runs (torch, Ray Train).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray.train
import torch
from ray.train import DataConfig

if TYPE_CHECKING:
    import ray.data

    from u2s.config import StorageConfig
    from u2s.eval.classifier_config import ClassifierConfig

logger = logging.getLogger(__name__)

#: Checkpoint types without an image-classification class of their own → the class that loads them.
MODEL_CLASS_FALLBACKS = {"vit_mae": "ViTForImageClassification"}
#: Normalization when neither the config nor the model's image processor gives one.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelInputs:
    """What the model expects: square input side and per-channel normalization."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _processor_size(processor: Any) -> int | None:
    for name in ("crop_size", "size"):
        value = getattr(processor, name, None)
        if isinstance(value, int):
            return value
        if value is not None:
            value = dict(value) if not isinstance(value, dict) else value
            side = value.get("height") or value.get("shortest_edge")
            if side:
                return int(side)
    return None


def model_inputs(cfg: ClassifierConfig) -> ModelInputs:
    """Input side and normalization: the config's, else the checkpoint's (model config, image processor)."""
    from transformers import AutoConfig, AutoImageProcessor

    processor = None
    if cfg.image_size is None or cfg.image_mean is None or cfg.image_std is None:
        try:
            processor = AutoImageProcessor.from_pretrained(cfg.model, revision=cfg.revision)
        except (OSError, ValueError, KeyError):
            logger.warning("no image processor with the model; using ImageNet normalization")
    size = cfg.image_size
    if size is None:
        model_config = AutoConfig.from_pretrained(cfg.model, revision=cfg.revision)
        side = getattr(model_config, "image_size", None)
        size = (side if isinstance(side, int) else None) or _processor_size(processor) or 224
    mean = cfg.image_mean or tuple(getattr(processor, "image_mean", None) or IMAGENET_MEAN)
    std = cfg.image_std or tuple(getattr(processor, "image_std", None) or IMAGENET_STD)
    return ModelInputs(size=int(size), mean=tuple(map(float, mean)), std=tuple(map(float, std)))


def _head(model: torch.nn.Module, name: str) -> torch.nn.Module:
    head = getattr(model, name, None)
    if not isinstance(head, torch.nn.Module):
        raise ValueError(f"{type(model).__name__} has no head module '{name}'; set classifier.head")
    return head


def load_classifier(cfg: ClassifierConfig, classes: list[str]) -> torch.nn.Module:
    """The pretrained model with a new, seeded linear head over ``classes`` (``from_pretrained``)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(cfg.model, revision=cfg.revision)
    name = cfg.model_class or MODEL_CLASS_FALLBACKS.get(config.model_type)
    model_cls = getattr(transformers, name) if name else transformers.AutoModelForImageClassification
    model = model_cls.from_pretrained(
        cfg.model, revision=cfg.revision, id2label=dict(enumerate(classes)),
        label2id={c: i for i, c in enumerate(classes)}, ignore_mismatched_sizes=True,
    )  # fmt: skip
    head = _head(model, cfg.head)
    torch.manual_seed(cfg.seed)  # the same initial head for every split
    for module in head.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    if cfg.mode == "linear_probe":
        for param in model.parameters():
            param.requires_grad_(False)
        for param in head.parameters():
            param.requires_grad_(True)
    return model


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters; biases and norm weights (1-d) get no weight decay, as in MAE."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class ExactTestSplit(DataConfig):
    """Splits ``test`` across workers without dropping rows (``equal=False``); others as Ray Train does."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        exact = {name: ds for name, ds in datasets.items() if name == "test"}
        rest = {name: ds for name, ds in datasets.items() if name != "test"}
        output = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
        hints = worker_node_ids if self._enable_shard_locality else None
        for name, ds in exact.items():
            ds = ds.copy(ds)
            ds.set_name(name)
            for rank, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                output[rank][name] = split
        return output


def _sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over workers (in place); a no-op for one worker."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor


def _autocast(device: torch.device, precision: str):
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _Normalize:
    """uint8 NHWC pixels → normalized float NCHW on the worker's device."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> None:
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.permute(0, 3, 1, 2).float() - self.mean) / self.std


def evaluate(model: torch.nn.Module, shard: Any, num_classes: int, normalize: _Normalize,
             device: torch.device, batch_size: int, precision: str) -> dict[str, float]:  # fmt: skip
    """top-1 and mean per-class accuracy over every worker's share of the test split."""
    module = getattr(model, "module", model)  # no DDP sync: workers may hold different numbers of batches
    module.eval()
    correct = torch.zeros(num_classes, dtype=torch.int64, device=device)
    total = torch.zeros(num_classes, dtype=torch.int64, device=device)
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=batch_size, device=device):
            target = batch["target"]
            with _autocast(device, precision):
                predicted = module(pixel_values=normalize(batch["pixels"])).logits.argmax(-1)
            total += torch.bincount(target, minlength=num_classes)
            correct += torch.bincount(target[predicted == target], minlength=num_classes)
    correct, total = _sum(correct).cpu(), _sum(total).cpu()
    seen = total > 0
    return {
        "top1": float(correct.sum() / total.sum()) if total.sum() else float("nan"),
        "mean_class_accuracy": float((correct[seen] / total[seen]).mean()) if seen.any() else float("nan"),
        "n_test": int(total.sum()),
    }


def train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train loop of one worker: fine-tune (or linear-probe), then test; reports every epoch."""
    import ray.train.torch
    from transformers import get_cosine_schedule_with_warmup

    from u2s.eval.classifier_config import ClassifierConfig

    cfg = ClassifierConfig.model_validate(config["classifier"])
    classes, inputs = config["classes"], ModelInputs(**config["inputs"])
    context = ray.train.get_context()
    world, rank = context.get_world_size(), context.get_world_rank()
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(load_classifier(cfg, classes))
    core = getattr(model, "module", model)
    lr = cfg.base_lr * cfg.batch_size * cfg.accum_steps * world / 256
    optimizer = torch.optim.AdamW(param_groups(core, cfg.weight_decay), lr=lr)
    steps = math.ceil(config["train_rows"] // world / cfg.batch_size)  # equal split: rows // world each
    updates = math.ceil(steps / cfg.accum_steps)
    warmup = round(cfg.warmup_epochs * updates)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, num_training_steps=cfg.epochs * updates)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    normalize = _Normalize(inputs.mean, inputs.std, device)
    train_shard = ray.train.get_dataset_shard("train")
    ddp = hasattr(model, "no_sync")
    metrics: dict[str, Any] = {}
    for epoch in range(cfg.epochs):
        model.train()
        if cfg.mode == "linear_probe":  # frozen backbone: keep its norm statistics and dropout off
            core.eval()
            _head(core, cfg.head).train()
        stats = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, seen
        pending = 0
        batches = train_shard.iter_torch_batches(
            batch_size=cfg.batch_size, device=device, local_shuffle_buffer_size=max(256, 4 * cfg.batch_size)
        )
        for step, batch in enumerate(batches):
            target = batch["target"]
            sync = (step + 1) % cfg.accum_steps == 0 or step + 1 >= steps
            with model.no_sync() if ddp and not sync else contextlib.nullcontext():
                with _autocast(device, cfg.precision):
                    logits = model(pixel_values=normalize(batch["pixels"])).logits
                loss = loss_fn(logits.float(), target)
                (loss / cfg.accum_steps).backward()
            pending += 1
            if sync:
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                pending = 0
            with torch.no_grad():  # on the device: no host sync per step
                stats[0] += loss.detach().double() * len(target)
                stats[1] += (logits.argmax(-1) == target).sum()
                stats[2] += len(target)
        if pending:  # fewer batches than planned (should not happen with an equal split)
            optimizer.zero_grad(set_to_none=True)
        _sum(stats)
        metrics = {"epoch": epoch + 1, "lr": scheduler.get_last_lr()[0],
                   "train_loss": float(stats[0] / max(stats[2], 1)),
                   "train_top1": float(stats[1] / max(stats[2], 1))}  # fmt: skip
        if epoch + 1 == cfg.epochs:
            metrics.update(evaluate(model, ray.train.get_dataset_shard("test"), len(classes), normalize,
                                    device, cfg.batch_size, cfg.precision))  # fmt: skip
        if rank == 0:
            logger.info("epoch %d/%d: %s", epoch + 1, cfg.epochs, metrics)
        ray.train.report(metrics)
    return metrics


def fit_classifier(
    cfg: ClassifierConfig,
    inputs: ModelInputs,
    classes: list[str],
    train: ray.data.Dataset,
    test: ray.data.Dataset,
    train_rows: int,
    *,
    workers: int,
    use_gpu: bool,
    cpus_per_worker: float = 1.0,
    run_name: str = "u2s-utility",
    storage_path: str | None = None,
    storage: StorageConfig | None = None,
) -> dict[str, Any]:
    """Train on ``train`` and test on ``test`` with a ``TorchTrainer``; returns the final metrics
    (``top1``, ``mean_class_accuracy``, ``n_test``, ``train_loss``, ``train_top1``...)."""
    import uuid
    from dataclasses import asdict

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run_config = RunConfig(name=f"{run_name}-{uuid.uuid4().hex[:8]}")
    if storage_path:
        from u2s.io.storage import arrow_filesystem, is_local

        if is_local(storage_path):
            run_config.storage_path = storage_path
        else:
            run_config.storage_filesystem, run_config.storage_path = arrow_filesystem(storage_path, storage)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"classifier": cfg.model_dump(mode="json"), "classes": classes,
                           "inputs": asdict(inputs), "train_rows": train_rows},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=run_config,
        datasets={"train": train, "test": test},
        dataset_config=ExactTestSplit(),
    )  # fmt: skip
    result = trainer.fit()
    metrics = getattr(result, "return_value", None) or result.metrics  # Train V2, else V1's last report
    if not metrics or "top1" not in metrics:
        raise RuntimeError("training finished without test metrics")
    return dict(metrics)

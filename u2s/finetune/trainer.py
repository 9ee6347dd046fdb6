"""``u2s finetune``: build the pairs, run the Ray Train ``TorchTrainer``, report the final checkpoint.

Checkpoints go to ``storage_path/name`` (local or s3://, the latter through the same s3fs filesystem u2s
reads and writes data with, so ``storage.endpoint_url`` applies); ``FailureConfig(max_failures)``
restarts the workers from the latest one after a worker dies, and ``--resume`` continues an interrupted
experiment of the same name (Ray Train restores its checkpoint list from the experiment folder). The
pair counts are written beside the checkpoints as ``finetune_data.json``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from u2s.finetune.config import FinetuneConfig

log = logging.getLogger(__name__)

SNAPSHOT_NAME = "checkpoint_manager_snapshot.json"  # Ray Train's record of an experiment's checkpoints
DATA_RECORD = "finetune_data.json"


class FinetuneError(RuntimeError):
    """A fine-tuning job that cannot start or did not finish; the message says why."""


@dataclass
class FinetuneResult:
    """What a fine-tuning job produced."""

    checkpoint: (
        str | None
    )  # the final checkpoint's folder (local path or s3:// URI): `stage2.<editor>.weights`
    metrics: dict[str, Any] = field(default_factory=dict)  # the last reported metrics (step, loss...)
    counts: dict[str, int] = field(default_factory=dict)  # pairs: rows, edited, clip_filtered, train, val
    path: str | None = None  # the experiment folder


def _storage(cfg: FinetuneConfig) -> tuple[str, Any]:
    """(storage_path for Ray Train, its pyarrow filesystem or None for a local folder)."""
    from u2s.io.storage import arrow_filesystem, is_local

    if is_local(cfg.storage_path):
        return cfg.storage_path, None
    fs, path = arrow_filesystem(cfg.storage_path, cfg.storage)
    return path, fs


def _uri(cfg: FinetuneConfig, path: str) -> str:
    """A path Ray Train reports (on the storage filesystem) as a URI users can pass back to u2s."""
    from u2s.io.storage import is_local

    if is_local(cfg.storage_path) or "://" in path:
        return path
    return f"{cfg.storage_path.split('://', 1)[0]}://{path.lstrip('/')}"


def experiment_exists(cfg: FinetuneConfig) -> bool:
    """Whether ``storage_path/name`` already holds a Ray Train experiment (its checkpoint record)."""
    from u2s.io.storage import filesystem, uri_join

    fs, path = filesystem(uri_join(cfg.experiment_uri, SNAPSHOT_NAME), cfg.storage)
    fs.invalidate_cache()
    return fs.exists(path)


def finetune(cfg: FinetuneConfig, resume: bool = False) -> FinetuneResult:
    """Train ``cfg.editor`` on the pairs of ``cfg.runs``; returns the final checkpoint and metrics.

    ``resume``: continue the experiment at ``storage_path/name`` from its latest checkpoint; without
    it an existing experiment there is refused (a new ``name`` starts afresh).
    """
    import ray.train
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from u2s.finetune.data import build_pairs
    from u2s.finetune.train_loop import collate, train_loop_per_worker
    from u2s.io.storage import uri_join, write_json
    from u2s.pipeline import init_ray

    if cfg.editor == "flux_kontext" and cfg.method != "lora":
        raise FinetuneError("flux_kontext trains a LoRA: set method: lora")
    exists = experiment_exists(cfg)
    if exists and not resume:
        raise FinetuneError(
            f"{cfg.experiment_uri} already holds a fine-tuning experiment: pass --resume to continue it, "
            "or set `name` to start a new one"
        )
    if resume and not exists:
        raise FinetuneError(f"nothing to resume: no experiment at {cfg.experiment_uri}")

    init_ray(cfg.ray_address)
    train, val, counts = build_pairs(cfg)
    log.info("pairs: %s", ", ".join(f"{k} {v}" for k, v in counts.items()))
    if cfg.precompute:
        from u2s.finetune.latents import precompute

        train, cache = precompute(cfg, train, collate)
        log.info("latent cache: %s (%s)", cache.uri, "reused" if cache.reused else "encoded")
    if counts["train"] < cfg.batch_size * cfg.num_workers:
        raise FinetuneError(
            f"{counts['train']} training pairs: fewer than batch_size × num_workers "
            f"({cfg.batch_size} × {cfg.num_workers})"
        )
    write_json(uri_join(cfg.experiment_uri, DATA_RECORD), cfg.storage, {"counts": counts})
    storage_path, storage_fs = _storage(cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"finetune": cfg.model_dump(mode="json")},
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=_worker_resources(cfg)
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep),
        ),
        datasets={"train": train, "val": val},
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise FinetuneError(f"training failed: {type(e).__name__}") from e
    checkpoint = _uri(cfg, result.checkpoint.path) if result.checkpoint is not None else None
    return FinetuneResult(
        checkpoint=checkpoint, metrics=dict(result.metrics or {}), counts=counts, path=_uri(cfg, result.path)
    )


def _worker_resources(cfg: FinetuneConfig) -> dict[str, float]:
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    return resources

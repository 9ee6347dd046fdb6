"""Utility evaluation (PAPER.md §4, Classification row): is an anonymized dataset still good to train on?

One image classifier is trained on the original training split and one on each anonymized training
split (u2s's safe table, a baseline's...), with the same settings and seed; each is tested on the
original test split. The report gives top-1 (and mean per-class accuracy) per split and the change
against the original, in percentage points. Training runs on Ray Train's ``TorchTrainer``, one
data-parallel worker per GPU of the cluster (one CPU worker without GPUs); images are read, checked and
augmented by Ray Data. Defaults are the paper's: MAE ViT-B/16 (``facebook/vit-mae-base``) with a new
linear head, 224 px, batch 64 × accumulation 4, 100 epochs, base lr 5e-4, RandAugment(2, 9, std 0.5),
RandomResizedCrop(0.08–1) + flip, evaluation at resize 256 + centre crop 224. ::

    report = evaluate_utility(UtilityConfig(
        original=SplitSource(uri="s3://data/caltech101/train"),
        methods={"u2s": SplitSource(uri="s3://runs/caltech101/safe")},
        test=SplitSource(uri="s3://data/caltech101/test"),
    ))
    print(format_report(report))
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from u2s.config import ConfigError, StorageConfig
from u2s.eval.classifier_config import ClassifierConfig
from u2s.eval.classifier_data import SplitSource, SplitStats

logger = logging.getLogger(__name__)

#: The reference split's name in reports.
ORIGINAL = "original"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class UtilityConfig(_Model):
    """One utility evaluation: the original training split, anonymized ones, the original test split."""

    original: SplitSource = Field(..., description="Original training split (the reference).")
    methods: dict[str, SplitSource] = Field(
        ..., description="Anonymized training splits by name (u2s's safe table, baselines...)."
    )
    test: SplitSource = Field(..., description="Original test split; every classifier is tested on it.")
    out: str | None = Field(None, description="Write the report as JSON here (local path or s3://).")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig)
    num_workers: int | None = Field(
        None, ge=1, description="Training workers (data parallel). None: one per GPU of the cluster when "
        "training on GPUs, else 1.",
    )  # fmt: skip
    use_gpu: bool | None = Field(None, description="Train on GPUs. None: when the cluster has any.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per training worker.")
    preprocess_cpus: float = Field(1.0, gt=0, description="CPUs per Ray Data augmentation task.")
    max_pixels: int = Field(89_478_485, ge=1, description="Images larger than this are excluded.")
    ray_address: str | None = Field(
        None, description="Ray address. None: attach to a running cluster, else start a local one."
    )
    storage_path: str | None = Field(
        None, description="Ray Train run folder (local or s3://; shared storage on multi-node clusters). "
        "None: Ray's default (~/ray_results).",
    )  # fmt: skip

    @field_validator("methods")
    @classmethod
    def _method_names(cls, value: dict[str, SplitSource]) -> dict[str, SplitSource]:
        if not value:
            raise ValueError("give at least one anonymized training split")
        if ORIGINAL in value:
            raise ValueError(f"'{ORIGINAL}' names the reference split; pick another method name")
        return value

    @model_validator(mode="after")
    def _absolute_out(self) -> UtilityConfig:
        for name in ("out", "storage_path"):
            value = getattr(self, name)
            if value and "://" not in value and not os.path.isabs(value):
                object.__setattr__(self, name, os.path.abspath(value))
        return self


def load_utility_config(
    path: str | Path | None = None, values: dict[str, Any] | None = None, overrides: list[str] | None = None
) -> UtilityConfig:
    """YAML file, then ``values`` (nested dict), then ``key.path=value`` overrides, validated.

    Raises :class:`u2s.config.ConfigError` naming each bad field.
    """
    from u2s.config import _deep_merge, apply_overrides, read_yaml_mapping, validate_config

    tree = read_yaml_mapping(path) if path else {}
    return validate_config(UtilityConfig, apply_overrides(_deep_merge(tree, values or {}), overrides))


# ------------------------------------------------------------------------------------------ report


@dataclass
class SplitResult:
    """One trained classifier: its training split's counts and its scores on the test split."""

    name: str
    train: SplitStats
    top1: float
    mean_class_accuracy: float
    n_scored: int
    delta_top1: float | None = None
    missing_classes: list[str] = field(default_factory=list)
    train_loss: float | None = None
    train_top1: float | None = None
    seconds: float = 0.0


@dataclass
class UtilityReport:
    """What ``u2s eval-utility`` prints and writes."""

    model: str
    mode: str
    epochs: int
    num_workers: int
    use_gpu: bool
    classes: list[str]
    test: SplitStats
    results: list[SplitResult]
    settings: dict[str, Any] = field(default_factory=dict)

    def result(self, name: str) -> SplitResult:
        return next(r for r in self.results if r.name == name)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["metric"] = "top1 on the original test split; delta_top1 = top1 - original top1"
        return out


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def format_report(report: UtilityReport) -> str:
    """The summary table: one row per training split, deltas in percentage points vs the original."""
    head = (f"utility: {report.model} ({report.mode}, {report.epochs} epochs, {report.num_workers} "
            f"{'GPU' if report.use_gpu else 'CPU'} worker(s)); test: {report.test.used} images, "
            f"{len(report.classes)} classes")  # fmt: skip
    width = max(len("split"), *(len(r.name) for r in report.results))
    lines = [head, f"{'split':<{width}}  {'n train':>8}  {'excluded':>8}  {'n test':>7}  {'top-1':>8}  "
             f"{'Δ top-1':>9}  {'class acc':>9}"]  # fmt: skip
    for r in report.results:
        delta = "—" if r.name == ORIGINAL or r.delta_top1 is None else f"{100 * r.delta_top1:+.2f} pp"
        lines.append(f"{r.name:<{width}}  {r.train.used:>8}  {sum(r.train.excluded.values()):>8}  "
                     f"{r.n_scored:>7}  {_pct(r.top1):>8}  {delta:>9}  "
                     f"{_pct(r.mean_class_accuracy):>9}")  # fmt: skip
    for r in report.results:
        if r.train.excluded:
            why = ", ".join(f"{k}: {v}" for k, v in sorted(r.train.excluded.items()))
            lines.append(f"{r.name}: excluded from training: {why}")
        if r.missing_classes:
            lines.append(f"{r.name}: no training image for {len(r.missing_classes)} class(es)")
    if report.test.excluded:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(report.test.excluded.items()))
        lines.append(f"test: excluded: {why}")
    return "\n".join(lines)


def write_report(report: UtilityReport, uri: str, storage: StorageConfig | None = None) -> None:
    """Write the report as JSON to a local path or ``s3://`` URI."""
    from u2s.io.storage import write_json

    write_json(uri, storage, report.to_dict())


# ------------------------------------------------------------------------------------------ facade


def scaling(cfg: UtilityConfig) -> tuple[int, bool]:
    """(workers, use_gpu): one worker per GPU of the cluster by default, one CPU worker without GPUs.

    Raises :class:`u2s.config.ConfigError` if GPUs are asked for, the cluster has none now and no worker
    count is given (with one, Ray Train waits for an autoscaling cluster to add GPU nodes).
    """
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = gpus > 0 if cfg.use_gpu is None else cfg.use_gpu
    if use_gpu and not gpus and cfg.num_workers is None:
        raise ConfigError("use_gpu is set but the Ray cluster has no GPU; on an autoscaling cluster, "
                          "set num_workers too")  # fmt: skip
    workers = cfg.num_workers or (gpus if use_gpu else 1)
    return workers, use_gpu


def evaluate_utility(cfg: UtilityConfig) -> UtilityReport:
    """Train one classifier per training split on Ray Train and test each on the original test split.

    Raises :class:`u2s.eval.classifier_data.SplitError` before any training when a split is missing,
    empty, unlabelled, or has labels the original training split lacks, and
    :class:`u2s.config.ConfigError` when the cluster cannot run the configured workers.
    """
    from u2s.eval.classifier_data import SplitError, check_labels, eval_inputs, load_split, train_inputs
    from u2s.eval.classifier_train import fit_classifier, model_inputs
    from u2s.pipeline import init_ray

    init_ray(cfg.ray_address)
    workers, use_gpu = scaling(cfg)
    clf = cfg.classifier
    spec = model_inputs(clf)
    splits = {ORIGINAL: cfg.original, **cfg.methods}
    loaded = {name: load_split(name, source, cfg.storage, cfg.max_pixels) for name, source in splits.items()}
    test_ds, test_stats = load_split("test", cfg.test, cfg.storage, cfg.max_pixels)
    classes = sorted(loaded[ORIGINAL][1].labels)
    missing = {name: check_labels(classes, name, stats) for name, (_, stats) in loaded.items()}
    check_labels(classes, "test", test_stats)
    for name, lacking in missing.items():
        if lacking:
            logger.warning("split %s has no training image for %d of %d classes", name, len(lacking),
                           len(classes))  # fmt: skip
    for name, (_, stats) in loaded.items():
        if stats.used < workers:
            raise SplitError(
                f"split '{name}': {stats.used} training images cannot be split over {workers} workers"
            )
    test_inputs = eval_inputs(test_ds, classes, spec.size, clf.crop_pct, cfg.preprocess_cpus)
    results = []
    for name, (ds, stats) in loaded.items():
        start = time.perf_counter()
        logger.info("training on split %s (%d images, %d workers)", name, stats.used, workers)
        train = train_inputs(ds, classes, spec.size, clf.augment_kwargs(), cfg.preprocess_cpus)
        metrics = fit_classifier(
            clf, spec, classes, train, test_inputs, stats.used, workers=workers, use_gpu=use_gpu,
            cpus_per_worker=cfg.cpus_per_worker, run_name=f"u2s-utility-{name}",
            storage_path=cfg.storage_path, storage=cfg.storage,
        )  # fmt: skip
        results.append(SplitResult(
            name=name, train=stats, top1=metrics["top1"], mean_class_accuracy=metrics["mean_class_accuracy"],
            n_scored=metrics["n_test"], missing_classes=missing[name], train_loss=metrics.get("train_loss"),
            train_top1=metrics.get("train_top1"), seconds=round(time.perf_counter() - start, 2),
        ))  # fmt: skip
    reference = results[0].top1
    for result in results:
        result.delta_top1 = result.top1 - reference
    return UtilityReport(
        model=clf.model, mode=clf.mode, epochs=clf.epochs, num_workers=workers, use_gpu=use_gpu,
        classes=classes, test=test_stats, results=results, settings=clf.model_dump(mode="json"),
    )  # fmt: skip

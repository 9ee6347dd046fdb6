"""`u2s eval` end to end: run the plan, stream ``metrics.parquet``, then ``summary.json`` and ``report.html``.

The driver only sees metric rows (no image bytes) and the report's few thumbnails; it writes
``metrics.parquet`` (one row per image × method) as batches arrive and keeps floats for the statistics.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from u2s.eval.job import SKIP_SUFFIX, build_plan, metric_fields, metric_names, sample_key
from u2s.eval.random_models import random_models
from u2s.eval.report import Sample, render_report
from u2s.eval.summary import Accumulator

if TYPE_CHECKING:
    from u2s.config import StorageConfig
    from u2s.eval.config import EvalConfig

logger = logging.getLogger(__name__)

#: Columns of ``metrics.parquet`` before the metric columns (no image, no text).
ROW_COLUMNS = (
    ("id", pa.string()), ("method", pa.string()), ("label", pa.string()), ("status", pa.string()),
    ("error", pa.string()), ("privacy_flag", pa.bool_()), ("editor", pa.string()),
    ("eval_status", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
)  # fmt: skip


@dataclass
class EvalResult:
    """What :func:`run_eval` returns."""

    summary: dict[str, Any]
    metrics_uri: str
    summary_uri: str
    report_uri: str
    wall_seconds: float


def run_editor(uri: str, storage: StorageConfig | None = None) -> str | None:
    """The editor of the run whose safe table (or ``_run.json``) is at ``uri``, from its run record; None
    when there is no readable record."""
    from u2s.io.storage import filesystem, uri_join

    record = uri if uri.rstrip("/").endswith("_run.json") else uri_join(uri, "_run.json")
    try:
        fs, path = filesystem(record, storage)
        with fs.open(path, "r") as f:
            editor = json.load(f)["config"]["stage2"]["editor"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return editor if isinstance(editor, str) else None


def private_text_allowed(cfg: EvalConfig) -> bool:
    """Whether the report may show captions and edit instructions: only when it is written on the
    sensitive side, i.e. ``out`` is a folder inside the sensitive table's folder."""
    if cfg.report.private_text == "never" or not cfg.sensitive_uri:
        return False
    return cfg.out.rstrip("/").startswith(cfg.sensitive_uri.rstrip("/") + "/")


class _Samples:
    """The report's rows: per method the ``k`` best by :func:`sample_key` among rows with thumbnails and
    error rows (shown with their reason, without images)."""

    def __init__(self, k: int, seed: int, metrics: list[str], texts: bool) -> None:
        self.k, self.seed, self.metrics, self.texts = k, seed, metrics, texts
        self.rows: dict[str, list[tuple[tuple, Sample]]] = {}

    def add(self, table: pa.Table) -> None:
        errors = pc.equal(table.column("eval_status"), "error")
        mask = pc.or_(pc.is_valid(table.column("thumb_original")), errors)
        for row in table.filter(mask).to_pylist():
            sample = Sample(
                id=row["id"], method=row["method"], status=row["status"], privacy_flag=row["privacy_flag"],
                original_jpeg=row["thumb_original"], anonymized_jpeg=row["thumb_anonymized"],
                scores={m: row[m] for m in self.metrics}, error=row["error"],
                public_caption=row["public_caption"] if self.texts else None,
                edit_instruction=row["edit_instruction"] if self.texts else None,
            )  # fmt: skip
            kept = self.rows.setdefault(row["method"], [])
            kept.append((sample_key(row, self.seed), sample))
            kept.sort(key=lambda item: item[0])
            del kept[self.k :]

    def by_method(self, methods: list[str]) -> dict[str, list[Sample]]:
        return {m: [s for _, s in self.rows.get(m, [])] for m in methods}


def _writer(uri: str, schema: pa.Schema, cfg: EvalConfig):
    import pyarrow.parquet as pq

    from u2s.io.storage import arrow_filesystem

    fs, path = arrow_filesystem(uri, cfg.storage)
    return pq.ParquetWriter(path, schema, filesystem=fs, compression="zstd")


def _write_text(uri: str, text: str, cfg: EvalConfig) -> None:
    from u2s.io.storage import filesystem

    fs, path = filesystem(uri, cfg.storage)
    with fs.open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _prepare_out(cfg: EvalConfig) -> dict[str, str]:
    from u2s.io.storage import filesystem, make_dirs, uri_join

    targets = {name: uri_join(cfg.out, name) for name in ("metrics.parquet", "summary.json", "report.html")}
    make_dirs(cfg.out, cfg.storage)  # local folders only: s3fs's makedirs would create a missing bucket
    if not cfg.overwrite:
        for uri in targets.values():
            target_fs, target = filesystem(uri, cfg.storage)
            if target_fs.exists(target):
                raise FileExistsError(f"{uri} exists; set overwrite to replace it")
    return targets


def run_eval(cfg: EvalConfig) -> EvalResult:
    """Evaluate every method of ``cfg`` against the originals and write the three outputs."""
    from u2s.pipeline import init_ray
    from u2s.quiet import quiet_ray_data

    start = time.perf_counter()
    targets = _prepare_out(cfg)
    init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.object_store_memory)
    quiet_ray_data()  # the command prints its own summary
    metrics = metric_names(cfg)
    schema = pa.schema([*ROW_COLUMNS, *metric_fields(metrics)])
    accumulator = Accumulator(list(cfg.methods), metrics)
    samples = _Samples(cfg.report.rows, cfg.seed, metrics, private_text_allowed(cfg))
    values: dict[str, dict[str, list[float]]] = {m: {k: [] for k in cfg.methods} for m in metrics}
    writer = _writer(targets["metrics.parquet"], schema, cfg)
    try:
        for batch in build_plan(cfg).iter_batches(batch_format="pyarrow", batch_size=None):
            if not batch.num_rows:
                continue
            accumulator.add(batch)
            samples.add(batch)
            rows = batch.filter(pc.not_equal(batch.column("eval_status"), "original_only"))
            writer.write_table(rows.select(schema.names).cast(schema))
            for metric in metrics:
                scored = rows.filter(pc.is_valid(rows.column(metric)))
                pairs = zip(
                    scored.column("method").to_pylist(), scored.column(metric).to_pylist(), strict=True
                )
                for method, value in pairs:
                    values[metric][method].append(value)
    finally:
        writer.close()
    summary = accumulator.summary(cfg.bootstrap_resamples, cfg.seed)
    summary["skip_suffix"] = SKIP_SUFFIX
    summary["config"] = cfg.model_dump(mode="json")
    summary["random_models"] = random_models(cfg)
    _write_text(targets["summary.json"], json.dumps(summary, indent=2), cfg)
    report = render_report(summary, values, samples.by_method(list(cfg.methods)), private_text_allowed(cfg))
    _write_text(targets["report.html"], report, cfg)
    return EvalResult(
        summary=summary, metrics_uri=targets["metrics.parquet"], summary_uri=targets["summary.json"],
        report_uri=targets["report.html"], wall_seconds=time.perf_counter() - start,
    )  # fmt: skip

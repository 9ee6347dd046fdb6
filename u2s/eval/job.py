"""The evaluation as one Ray Data plan:

    safe table of method 1 ──┐
    safe table of method 2 ──┴─ union ─ join originals (read_source) on id ─ [join sensitive on id]
        ─ prepare ─ one actor pool per metric family ─ thumbnails

One row per (image, method). ``prepare`` sets ``eval_status``: ``scored`` when both images decode;
``error`` for the method's error rows (counted apart, by stage); ``no_original``, ``original_error`` and
``anonymized_error`` otherwise; ``original_only`` for originals a method lacks (counted as missing).
Each metric family (:data:`u2s.eval.metrics.FAMILIES`) runs in its own actor pool, loading its models
once per actor, and adds a value column and a ``<metric>__skipped`` reason column per metric. The last
stage keeps small JPEG thumbnails for the report's sample only (a streaming top-k per method: edited rows
first, then the rest (error rows get no thumbnail); flagged rows first within each; then a seeded hash
of the id) and drops the image bytes.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import io
import logging
import posixpath
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from u2s.eval.metrics import METRICS, Pair, Skip, families_of, family_class, unavailable_reason

if TYPE_CHECKING:
    import ray.data

    from u2s.config import Resources, StorageConfig
    from u2s.eval.config import EvalConfig
    from u2s.eval.metrics import MetricFamily

logger = logging.getLogger(__name__)

SKIP_SUFFIX = "__skipped"
#: Columns read from a safe table when present (id, image and status are required).
SAFE_COLUMNS = ("id", "image", "status", "error", "privacy_flag", "public_caption", "editor")
SENSITIVE_COLUMNS = ("id", "private_caption", "edit_instruction", "combined_caption")
TEXT_COLUMNS = ("public_caption", "private_caption", "edit_instruction", "combined_caption")

ROW_SCHEMA = pa.schema([
    ("id", pa.string()), ("method", pa.string()), ("label", pa.string()), ("status", pa.string()),
    ("error", pa.string()), ("privacy_flag", pa.bool_()), ("editor", pa.string()),
    ("eval_status", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("orig", pa.binary()), ("anon", pa.binary()),
    *((name, pa.string()) for name in TEXT_COLUMNS),
])  # fmt: skip


class EvalInputError(ValueError):
    """An evaluation input that cannot be read (missing table, missing columns...)."""


def metric_fields(metrics: list[str]) -> list[pa.Field]:
    """The value and skip-reason columns of ``metrics``."""
    out = []
    for name in metrics:
        out += [pa.field(name, pa.float64()), pa.field(name + SKIP_SUFFIX, pa.string())]
    return out


# ---------------------------------------------------------------------------------------------- inputs


def read_originals(cfg: EvalConfig) -> ray.data.Dataset:
    """Originals as ``id, label, orig, has_original`` rows (the one dependency on the readers)."""
    from u2s.io.ids import read_id_key
    from u2s.io.readers import read_source

    # Keyed ids (input.id: keyed) match the run's only under its key, kept beside its sensitive table.
    keyed = cfg.original.id == "keyed" and cfg.sensitive_uri
    id_key = read_id_key(cfg.sensitive_uri, cfg.storage) if keyed else None
    return read_source(cfg.original, cfg.storage, cfg.resources.io, id_key).map_batches(
        _original_rows, batch_format="pyarrow", **cfg.resources.io.ray_remote_args()
    )


def _original_rows(batch: pa.Table) -> pa.Table:
    images = batch.column("image").to_pylist()
    labels = batch.column("label") if "label" in batch.column_names else pa.nulls(len(batch), pa.string())
    return pa.table({
        "id": batch.column("id").cast(pa.string()),
        "label": labels.cast(pa.string()),
        "orig": pa.array([(image or {}).get("bytes") for image in images], pa.binary()),
        "has_original": pa.array([True] * len(batch), pa.bool_()),
    })  # fmt: skip


def parquet_files(uri: str, storage: StorageConfig) -> list[str]:
    """The table's Parquet files: ``uri`` itself, or the ``*.parquet`` directly inside the folder (hidden
    and ``_`` files left out). A run's ``_run.json`` leads to the table in its folder."""
    from u2s.eval.flags import resolve_table_uri
    from u2s.io.storage import filesystem, to_uri

    uri = resolve_table_uri(uri, storage)
    fs, path = filesystem(uri, storage)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        raise EvalInputError(f"table not found: {uri}")
    if fs.isfile(path):
        return [to_uri(fs, path)]
    names = [
        p for p in fs.ls(path, detail=False)
        if p.endswith(".parquet") and not posixpath.basename(p).startswith((".", "_")) and fs.isfile(p)
    ]  # fmt: skip
    if not names:
        raise EvalInputError(f"no .parquet files in {uri}")
    return [to_uri(fs, p) for p in sorted(names)]


def _table_columns(files: list[str], storage: StorageConfig) -> list[str]:
    import pyarrow.parquet as pq

    from u2s.io.storage import arrow_filesystem

    afs, path = arrow_filesystem(files[0], storage)
    with afs.open_input_file(path) as f:
        return pq.read_schema(f).names


def _read_table(
    uri: str, columns: tuple[str, ...], required: tuple[str, ...], to_rows, cfg: EvalConfig
) -> ray.data.Dataset:
    """A table's files, read by Ray tasks (one per file, streamed in batches), through ``to_rows``.

    Reading with plain tasks (not ``read_parquet``) keeps every task at ``resources.io.num_cpus``, so a
    small cluster whose CPUs are mostly held by the metric actors still has room to read and join.
    """
    files = parquet_files(uri, cfg.storage)
    present = _table_columns(files, cfg.storage)
    missing = [c for c in required if c not in present]
    if missing:
        raise EvalInputError(f"{uri}: not a u2s table (missing columns: {', '.join(missing)})")
    import ray.data

    wanted = [c for c in columns if c in present]
    return ray.data.from_items([{"file": f} for f in files], override_num_blocks=len(files)).map_batches(
        _read_files, fn_kwargs={"columns": wanted, "to_rows": to_rows, "storage": cfg.storage},
        batch_size=1, batch_format="pyarrow", **cfg.resources.io.ray_remote_args(),
    )  # fmt: skip


def _read_files(batch: pa.Table, columns: list[str], to_rows, storage: StorageConfig):
    import pyarrow.parquet as pq

    from u2s.io.storage import arrow_filesystem

    for uri in batch.column("file").to_pylist():
        afs, path = arrow_filesystem(uri, storage)
        with afs.open_input_file(path) as f:
            for part in pq.ParquetFile(f).iter_batches(batch_size=64, columns=columns):
                yield to_rows(pa.Table.from_batches([part]))


def read_method(name: str, uri: str, cfg: EvalConfig) -> ray.data.Dataset:
    """One method's safe table as ``id, method, status, error, privacy_flag, public_caption, editor,
    anon`` rows (columns a table lacks are null)."""
    return _read_table(
        uri, SAFE_COLUMNS, ("id", "image", "status"), functools.partial(_method_rows, method=name), cfg
    )


def _column(batch: pa.Table, name: str, dtype: pa.DataType) -> pa.Array:
    if name in batch.column_names:
        return batch.column(name).combine_chunks().cast(dtype)
    return pa.nulls(len(batch), dtype)


def _method_rows(batch: pa.Table, method: str) -> pa.Table:
    images = batch.column("image").to_pylist()
    return pa.table({
        "id": _column(batch, "id", pa.string()),
        "method": pa.array([method] * len(batch), pa.string()),
        "status": _column(batch, "status", pa.string()),
        "error": _column(batch, "error", pa.string()),
        "privacy_flag": _column(batch, "privacy_flag", pa.bool_()),
        "public_caption": _column(batch, "public_caption", pa.string()),
        "editor": _column(batch, "editor", pa.string()),
        "anon": pa.array([(image or {}).get("bytes") for image in images], pa.binary()),
    })  # fmt: skip


def read_sensitive(cfg: EvalConfig) -> ray.data.Dataset:
    """The sensitive table's texts by id (``private_caption``, ``edit_instruction``, ``combined_caption``)."""
    assert cfg.sensitive_uri
    return _read_table(cfg.sensitive_uri, SENSITIVE_COLUMNS, ("id",), _sensitive_rows, cfg)


def _sensitive_rows(batch: pa.Table) -> pa.Table:
    return pa.table({name: _column(batch, name, pa.string()) for name in SENSITIVE_COLUMNS})


# --------------------------------------------------------------------------------------------- prepare


def _decodes(data: bytes | None) -> tuple[int, int] | None:
    from u2s.io.decode import DecodeError, load_rgb

    if not data:
        return None
    try:
        image = load_rgb(data)
    except DecodeError:
        return None
    return image.size


def prepare(batch: pa.Table, sensitive_method: str | None, sampled: bool) -> pa.Table:
    """Joined rows → :data:`ROW_SCHEMA` rows with ``eval_status`` (see the module docstring)."""
    rows = []
    for row in batch.to_pylist():
        out = {name: row.get(name) for name in ROW_SCHEMA.names}
        if row.get("method") != sensitive_method:  # the run's own texts belong to its own rows
            out["edit_instruction"] = out["combined_caption"] = None
        if row.get("method") is None:
            status = "original_only"
        elif row.get("status") == "error":
            status = "error"
        elif not row.get("has_original"):
            if sampled:
                continue  # outside the evaluated sample of originals
            status = "no_original"
        elif _decodes(row.get("orig")) is None:
            status = "original_error"
        elif (size := _decodes(row.get("anon"))) is None:
            status = "anonymized_error"
        else:
            status = "scored"
            out["width"], out["height"] = size
        out["eval_status"] = status
        rows.append(out)
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


# ------------------------------------------------------------------------------------------ families


class FamilyStage:
    """Ray Data actor: one metric family, built once per actor, scoring ``scored`` rows batch by batch.

    A family that cannot load makes every pair skipped with ``unavailable: <reason>``; a batch that
    fails skips its pairs with ``failed: <exception type>``. Neither stops the job.
    """

    def __init__(self, config: EvalConfig, family: str, metrics: list[str]) -> None:
        self.family, self.metrics = family, metrics
        self.impl: MetricFamily | None = None
        self.unavailable: str | None = None
        try:
            self.impl = family_class(family)(config, metrics)
        except Exception as e:  # missing package, weights not in the cache offline, bad model folder...
            self.unavailable = unavailable_reason(e)
            logger.warning("metric family %s %s", family, self.unavailable)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from u2s.io.decode import load_rgb

        rows = batch.to_pylist()
        todo = [i for i, row in enumerate(rows) if row["eval_status"] == "scored"]
        scores: dict[int, dict[str, Any]] = {}
        if todo and self.unavailable:
            scores = {i: dict.fromkeys(self.metrics, Skip(self.unavailable)) for i in todo}
        elif todo:
            assert self.impl is not None
            pairs = [
                Pair(
                    id=rows[i]["id"], method=rows[i]["method"], original=load_rgb(rows[i]["orig"]),
                    anonymized=load_rgb(rows[i]["anon"]), public_caption=rows[i]["public_caption"],
                    private_caption=rows[i]["private_caption"], combined_caption=rows[i]["combined_caption"],
                )
                for i in todo
            ]  # fmt: skip
            try:
                scores = dict(zip(todo, self.impl.score(pairs), strict=True))
            except Exception as e:  # a bug or a device failure: skip these pairs, keep the job
                reason = f"failed: {type(e).__name__}"
                logger.error("metric family %s %s on %d pairs", self.family, reason, len(todo))
                scores = {i: dict.fromkeys(self.metrics, Skip(reason)) for i in todo}
        for name in self.metrics:
            values, reasons = [], []
            for i in range(len(rows)):
                score = scores.get(i, {}).get(name)
                values.append(None if score is None or isinstance(score, Skip) else float(score))
                reasons.append(score.reason if isinstance(score, Skip) else None)
            batch = batch.append_column(pa.field(name, pa.float64()), pa.array(values, pa.float64()))
            skipped = pa.field(name + SKIP_SUFFIX, pa.string())
            batch = batch.append_column(skipped, pa.array(reasons, pa.string()))
        return batch


def thumbnail(data: bytes, size: int) -> bytes:
    """A JPEG of the image fitted into ``size``² (for the report)."""
    from u2s.io.decode import load_rgb
    from u2s.stage1.engines.messages import fit_image

    buf = io.BytesIO()
    fit_image(load_rgb(data), size).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


#: Report order of row statuses: what the method changed first, then its failures, then kept rows.
SAMPLE_ORDER = {"edited": 0, "error": 1}


def sample_key(row: dict, seed: int) -> tuple[int, int, int]:
    """Report order (smallest first): edited rows, error rows, the rest (kept); flagged rows first within
    each; then a seeded hash of the id."""
    digest = int.from_bytes(hashlib.sha1(f"{seed}:{row['id']}".encode()).digest()[:8], "big")
    return (SAMPLE_ORDER.get(row.get("status") or "", 2), 0 if row.get("privacy_flag") else 1, digest)


class ThumbnailStage:
    """Ray Data actor: thumbnails for rows that enter this actor's top ``k`` per method (by
    :func:`sample_key`), image bytes dropped. The global top ``k`` always get thumbnails, and only
    about ``k · ln(n / k)`` rows per actor do in all."""

    def __init__(self, k: int, size: int, seed: int) -> None:
        self.k, self.size, self.seed = k, size, seed
        self.best: dict[str, list] = {}  # method → max-heap (negated keys) of the k best keys seen

    def _enters(self, row: dict) -> bool:
        if self.k <= 0 or row["eval_status"] != "scored":
            return False
        key = sample_key(row, self.seed)
        heap = self.best.setdefault(row["method"], [])
        negated = tuple(-x for x in key)
        if len(heap) < self.k:
            heapq.heappush(heap, negated)
            return True
        if negated > heap[0]:
            heapq.heapreplace(heap, negated)
            return True
        return False

    def __call__(self, batch: pa.Table) -> pa.Table:
        originals, anonymized = [], []
        columns = ["id", "method", "eval_status", "privacy_flag", "status", "orig", "anon"]
        for row in batch.select(columns).to_pylist():
            keep = self._enters(row)
            originals.append(thumbnail(row["orig"], self.size) if keep else None)
            anonymized.append(thumbnail(row["anon"], self.size) if keep else None)
        batch = batch.drop_columns(["orig", "anon"])
        batch = batch.append_column("thumb_original", pa.array(originals, pa.binary()))
        return batch.append_column("thumb_anonymized", pa.array(anonymized, pa.binary()))


# ------------------------------------------------------------------------------------------------ plan


def _actor_stage(ds: ray.data.Dataset, cls: type, resources: Resources, **kwargs: Any) -> ray.data.Dataset:
    import ray.data

    return ds.map_batches(
        cls,
        fn_constructor_kwargs=kwargs,
        batch_size=resources.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(**resources.actor_pool_kwargs()),
        **resources.ray_remote_args(),
    )


def build_plan(cfg: EvalConfig) -> ray.data.Dataset:
    """The lazy evaluation plan: one row per (image, method), metric columns, thumbnails."""
    io_args = cfg.resources.io.ray_remote_args()
    methods = [read_method(name, uri, cfg) for name, uri in cfg.methods.items()]
    ds = methods[0].union(*methods[1:]) if len(methods) > 1 else methods[0]
    join = {"num_partitions": cfg.resources.join_partitions, "on": ("id",),
            "aggregator_ray_remote_args": {"num_cpus": cfg.resources.join_num_cpus}}  # fmt: skip
    ds = ds.join(read_originals(cfg), "full_outer", **join)
    if cfg.sensitive_uri:
        ds = ds.join(read_sensitive(cfg), "left_outer", **join)
    sensitive_method = next(iter(cfg.methods)) if cfg.sensitive_uri else None
    ds = ds.map_batches(
        prepare, fn_kwargs={"sensitive_method": sensitive_method, "sampled": cfg.original.limit is not None},
        batch_size=cfg.resources.io.batch_size, batch_format="pyarrow", **io_args,
    )  # fmt: skip
    for family, metrics in families_of(cfg.metrics).items():
        resources = getattr(cfg.resources, family)
        ds = _actor_stage(ds, FamilyStage, resources, config=cfg, family=family, metrics=metrics)
    report = cfg.report
    return _actor_stage(
        ds, ThumbnailStage, cfg.resources.io.model_copy(update={"pool_size": 1}), k=report.rows,
        size=report.thumb_size, seed=cfg.seed,
    )  # fmt: skip


def metric_names(cfg: EvalConfig) -> list[str]:
    """The metrics of ``cfg`` in report order."""
    return [name for name in METRICS if name in cfg.metrics]

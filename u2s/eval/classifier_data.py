"""Labelled image splits for the utility evaluation: read, validate, count, and feed a classifier.

A split is a u2s safe table (Parquet with ``id``, ``label``, ``image`` and ``status``: rows whose status is
``kept`` or ``edited`` are used, the rest are excluded and counted) or any input u2s reads (class folders,
a Parquet table with an image and a label column). Every split is read once, each image is decoded once
to check it, and the encoded bytes are materialized in Ray's object store, so the training epochs re-read
neither storage nor bad rows. Only counts and label names are brought to the driver; images stay in Ray.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from u2s.config import StorageConfig

if TYPE_CHECKING:
    import ray.data

logger = logging.getLogger(__name__)

#: Table statuses whose rows carry a publishable image.
USED_STATUSES = ("kept", "edited")
SplitFormat = Literal["auto", "table", "class_folders", "parquet"]


class SplitError(ValueError):
    """A split that cannot be used for the utility evaluation (no rows, no labels, unknown labels...)."""


class SplitSource(BaseModel):
    """Where one labelled split comes from."""

    model_config = ConfigDict(extra="forbid")

    uri: str = Field(..., description="Local path or s3:// URI: a u2s safe table (folder, Parquet file or "
                     "its run's `_run.json`), class folders, or a Parquet table.")  # fmt: skip
    format: SplitFormat = Field(
        "auto",
        description="table: a u2s safe table (kept/edited rows used, error rows excluded and counted); "
        "class_folders: root/<class>/<image>; parquet: any Parquet table with an image and a label "
        "column; auto: `_run.json` or Parquet with a `status` column → table, other Parquet → parquet, "
        "else class_folders.",
    )
    image_column: str = Field("image", description="parquet only: image column ({bytes, path} or binary).")
    label_column: str = Field("label", description="parquet only: the label column.")

    @field_validator("uri")
    @classmethod
    def _absolute(cls, value: str) -> str:
        return value if "://" in value else os.path.abspath(os.path.expanduser(value))


@dataclass
class SplitStats:
    """Counts of one split (no image content, no paths of single images)."""

    uri: str
    format: str
    rows: int = 0
    used: int = 0
    excluded: dict[str, int] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------ reading


def _parquet_files(uri: str, storage: StorageConfig) -> list[str]:
    """URIs of the Parquet files at ``uri`` (a file, or a folder searched recursively; hidden files and
    ``_``-prefixed ones such as ``_SUCCESS`` are skipped)."""
    from u2s.io.storage import filesystem, to_uri

    fs, path = filesystem(uri, storage)
    if fs.isfile(path):
        return [to_uri(fs, path)] if path.endswith(".parquet") else []
    found = (p for p in fs.find(path) if p.endswith(".parquet"))
    return sorted(to_uri(fs, p) for p in found if not any(part.startswith(("_", ".")) for part in
                                                           p[len(path):].split("/")))  # fmt: skip


def _parquet_columns(uri: str, storage: StorageConfig) -> list[str]:
    import pyarrow.parquet as pq

    from u2s.io.storage import arrow_filesystem

    afs, path = arrow_filesystem(uri, storage)
    with afs.open_input_file(path) as f:
        return pq.read_schema(f).names


def resolve_source(source: SplitSource, storage: StorageConfig) -> SplitSource:
    """``source`` with ``format`` decided and a run's public ``_run.json`` replaced by the safe table it
    sits in."""
    from u2s.io.storage import filesystem

    uri, fmt = source.uri, source.format
    if uri.rstrip("/").endswith("_run.json"):
        uri, fmt = uri.rstrip("/").rsplit("/", 1)[0], "table"
    fs, path = filesystem(uri, storage)
    if not fs.exists(path):
        raise SplitError(f"split not found: {uri}")
    if fmt == "auto":
        files = _parquet_files(uri, storage)
        if not files:
            fmt = "class_folders"
        else:
            fmt = "table" if "status" in _parquet_columns(files[0], storage) else "parquet"
    return source.model_copy(update={"uri": uri, "format": fmt})


def read_input(source: SplitSource, storage: StorageConfig) -> ray.data.Dataset:
    """Class folders or a Parquet table through u2s's readers: rows with ``id``, ``label``, ``image``
    ({bytes, path}) and ``status`` (``error`` for rows that could not be read).

    This is the one call into :mod:`u2s.io.readers`; adapt it here if the reader API changes.
    """
    from u2s.config import InputConfig, Resources
    from u2s.io.readers import InputError, read_source

    # Ids stay inside the utility job (never written), so they need no output's key.
    input_cfg = InputConfig(uri=source.uri, format=source.format, image_column=source.image_column,
                            label_column=source.label_column, id="source_hash")  # fmt: skip
    try:
        return read_source(input_cfg, storage, Resources(batch_size=64, num_cpus=0.25))
    except InputError as e:
        raise SplitError(str(e)) from None


def read_table(source: SplitSource, storage: StorageConfig) -> ray.data.Dataset:
    """A u2s safe table: ``id``, ``label``, ``image`` and ``status`` columns of its Parquet files."""
    import ray.data

    from u2s.io.storage import arrow_filesystem

    files = _parquet_files(source.uri, storage)
    if not files:
        raise SplitError(f"no .parquet files in table {source.uri}")
    columns = ["id", "label", "image", "status"]
    missing = [c for c in columns if c not in _parquet_columns(files[0], storage)]
    if missing:
        raise SplitError(f"{source.uri}: not a u2s safe table (missing columns: {', '.join(missing)})")
    afs, _ = arrow_filesystem(source.uri, storage)
    paths = [arrow_filesystem(uri, storage)[1] for uri in files]
    return ray.data.read_parquet(paths, filesystem=afs, columns=columns)


def read_split(source: SplitSource, storage: StorageConfig) -> ray.data.Dataset:
    """The rows of a resolved split (see :func:`resolve_source`), before validation."""
    if source.format == "table":
        return read_table(source, storage)
    return read_input(source, storage)


# ------------------------------------------------------------------------------------------ validation


def _image_bytes(cell: Any) -> bytes | None:
    if isinstance(cell, dict):
        return cell.get("bytes")
    return cell


def _check_batch(batch: pa.Table, table: bool, max_pixels: int) -> pa.Table:
    """Rows → (label, image bytes, excluded reason or null); each image is decoded once to check it."""
    from u2s.io.decode import DecodeError, load_rgb

    labels, images, excluded = [], [], []
    for row in batch.select(["label", "image", "status"]).to_pylist():
        status, data, reason = row["status"], _image_bytes(row["image"]), None
        if table and status not in USED_STATUSES:
            reason = "error row" if status == "error" else f"status {status}"
        elif not table and status == "error":
            reason = "unreadable"
        elif not data:
            reason = "no image"
        else:
            try:
                load_rgb(data, max_pixels=max_pixels)
            except DecodeError:
                reason = "undecodable"
        label = row["label"]
        labels.append(None if label is None or str(label) == "" else str(label))
        images.append(None if reason else data)
        excluded.append(reason)
    return pa.table({"label": pa.array(labels, pa.string()), "image": pa.array(images, pa.binary()),
                     "excluded": pa.array(excluded, pa.string())})  # fmt: skip


def _usable(batch: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    return batch.filter(pc.is_null(batch["excluded"])).select(["label", "image"])


def load_split(
    name: str, source: SplitSource, storage: StorageConfig, max_pixels: int = 89_478_485
) -> tuple[ray.data.Dataset, SplitStats]:
    """Read, check and materialize one split; returns its usable rows (``label``, ``image`` bytes) and
    counts. Raises :class:`SplitError` when it has no usable row or a usable row has no label."""
    source = resolve_source(source, storage)
    checked = read_split(source, storage).map_batches(
        _check_batch, batch_format="pyarrow", batch_size=64, num_cpus=0.5,
        fn_kwargs={"table": source.format == "table", "max_pixels": max_pixels},
    ).materialize()  # fmt: skip
    stats = SplitStats(uri=source.uri, format=source.format)
    labels: Counter[str] = Counter()
    excluded: Counter[str] = Counter()
    unlabelled = 0
    for batch in checked.select_columns(["label", "excluded"]).iter_batches(batch_format="pyarrow"):
        for label, reason in zip(batch["label"].to_pylist(), batch["excluded"].to_pylist(), strict=True):
            stats.rows += 1
            if reason:
                excluded[reason] += 1
            elif label is None:
                unlabelled += 1
            else:
                labels[label] += 1
    stats.used, stats.excluded = sum(labels.values()), dict(excluded)
    stats.labels = dict(sorted(labels.items()))
    if unlabelled:
        raise SplitError(f"split '{name}' ({source.uri}): {unlabelled} of {stats.rows} rows have no label "
                         f"(format {source.format}); every image needs a class label")  # fmt: skip
    if not stats.used:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(excluded.items())) or "no rows"
        raise SplitError(f"split '{name}' ({source.uri}) has no usable rows ({stats.rows} rows; {why})")
    logger.info("split %s: %d rows, %d used, %d classes", name, stats.rows, stats.used, len(labels))
    return checked.map_batches(_usable, batch_format="pyarrow", batch_size=None), stats


def check_labels(classes: list[str], name: str, stats: SplitStats) -> list[str]:
    """Raise :class:`SplitError` if ``stats`` has labels outside ``classes``; return the classes it lacks."""
    unknown = sorted(set(stats.labels) - set(classes))
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise SplitError(f"label set mismatch: split '{name}' has {len(unknown)} label(s) that the original "
                         f"training split lacks ({shown})")  # fmt: skip
    return sorted(set(classes) - set(stats.labels))


# ------------------------------------------------------------------------------------------ model inputs


def _train_batch(batch: dict[str, np.ndarray], class_index: dict[str, int], size: int,
                 augment: dict[str, Any]) -> dict[str, np.ndarray]:  # fmt: skip
    """Encoded images → augmented ``pixels`` (N×size×size×3 uint8) and ``target`` class indices."""
    from u2s.eval.augment import train_transform
    from u2s.io.decode import load_rgb

    rng = np.random.default_rng()  # fresh entropy per batch: every epoch sees new augmentations
    pixels = [train_transform(load_rgb(data), size, rng, **augment) for data in batch["image"]]
    return {"pixels": np.stack(pixels), "target": np.array([class_index[x] for x in batch["label"]])}


def _eval_batch(batch: dict[str, np.ndarray], class_index: dict[str, int], size: int,
                crop_pct: float) -> dict[str, np.ndarray]:  # fmt: skip
    from u2s.eval.augment import eval_transform
    from u2s.io.decode import load_rgb

    pixels = [eval_transform(load_rgb(data), size, crop_pct) for data in batch["image"]]
    return {"pixels": np.stack(pixels), "target": np.array([class_index[x] for x in batch["label"]])}


def train_inputs(ds: ray.data.Dataset, classes: list[str], size: int, augment: dict[str, Any],
                 num_cpus: float = 1.0) -> ray.data.Dataset:  # fmt: skip
    """Training inputs: blocks in a new random order each epoch, augmented in Ray Data tasks."""
    class_index = {c: i for i, c in enumerate(classes)}
    return ds.randomize_block_order().map_batches(
        _train_batch, batch_format="numpy", batch_size=32, num_cpus=num_cpus,
        fn_kwargs={"class_index": class_index, "size": size, "augment": augment},
    )  # fmt: skip


def eval_inputs(ds: ray.data.Dataset, classes: list[str], size: int, crop_pct: float,
                num_cpus: float = 1.0) -> ray.data.Dataset:  # fmt: skip
    """Evaluation inputs: resize + centre crop, in Ray Data tasks."""
    class_index = {c: i for i, c in enumerate(classes)}
    return ds.map_batches(
        _eval_batch, batch_format="numpy", batch_size=32, num_cpus=num_cpus,
        fn_kwargs={"class_index": class_index, "size": size, "crop_pct": crop_pct},
    )  # fmt: skip

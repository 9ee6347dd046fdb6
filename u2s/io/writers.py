"""Sinks: the safe table and the sensitive table, written in one streaming pass, exactly once.

A Ray Dataset executes once per consumption, so writing two tables with two `write_parquet` calls
would run every model twice. :class:`SafeAndSensitiveDatasink` instead projects each block inside the
same write task (Arrow only, no Python rows): the safe projection goes to ``output.uri``, the sensitive
one (every row: source, categories, captions, instruction, timings) to ``output.sensitive_uri``.

Exactly once, whatever Ray retries:

- **Deterministic names.** A write task's files are named from the write's id and the task index,
  ``part-{write_uuid}-{task_idx:06d}-{k:03d}.parquet`` (Ray's own file sinks use the same two parts), so a
  task that Ray re-runs after its worker died rewrites the very same files instead of adding copies.
- **Commit order.** Each sensitive file is closed (made visible) before its safe twin, so a safe file is
  the commit record of its rows: a crash between the two leaves a sensitive file without a safe twin,
  which ``--resume`` deletes. An S3 object appears whole or not at all; local files are written under a
  hidden temporary name and renamed.
- **Bounded memory.** Ray hands a write task about ``max_file_bytes`` of rows, or a sixteenth of the
  cluster's object store if that is less (:func:`write_bundle_bytes`); the task streams them block by block
  into row groups of ``row_group_bytes`` and closes a file at ``rows_per_file`` rows or ``max_file_bytes``
  bytes, whichever comes first.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasink  # this module is imported only by the pipeline, never by the CLI's import
from ray.data.block import BlockAccessor

from u2s.config import OutputConfig, StorageConfig
from u2s.io.storage import (
    TransientStorageError,
    arrow_filesystem,
    check_output_location,
    filesystem,
    is_local,
    is_transient,
    make_dirs,
)
from u2s.schema import SENSITIVE_SCHEMA, STAGES, WORKING_SCHEMA, Status, safe_schema

logger = logging.getLogger(__name__)

#: Test-only fault hook, ``exit:<marker>`` or ``hang:<marker>``: the first write task to commit a file
#: pair creates the marker file, then ``exit`` ends its worker at once (``os._exit``, as a spot preemption
#: would; Ray re-runs the task) and ``hang`` stops it, and every write task after it, before writing more
#: (so a test can kill the driver with exactly one file pair committed).
FAULT_AFTER_COMMIT = "U2S_FAULT_AFTER_COMMIT"
_HANG_SECONDS = 3600

UNFINISHED = "pipeline: row left every stage without a final status"
PUBLISHED = (Status.KEPT.value, Status.EDITED.value)


class OutputExistsError(FileExistsError):
    """An output location already holds data and neither `--resume` nor `output.overwrite` is set."""


@dataclass
class WriteSummary:
    """Counts of written rows; summed over write tasks, or computed from a whole sensitive table."""

    rows: int = 0
    flagged: int = 0
    triplets: int = 0
    metadata_removed: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    errors_by_stage: dict[str, int] = field(default_factory=dict)
    stage_rows: dict[str, int] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def add(self, other: WriteSummary | dict[str, Any]) -> None:
        other = asdict(other) if isinstance(other, WriteSummary) else other
        for name in ("rows", "flagged", "triplets", "metadata_removed"):
            setattr(self, name, getattr(self, name) + other[name])
        for name in ("by_status", "errors_by_stage", "stage_rows", "stage_seconds"):
            mine = getattr(self, name)
            for key, value in other[name].items():
                mine[key] = mine.get(key, 0) + value


def summarize(table: pa.Table) -> WriteSummary:
    """Counts of a table holding the sensitive columns (status, error, flags, captions, timings)."""

    def count(column: str) -> int:
        return pc.sum(pc.fill_null(table.column(column), False)).as_py() or 0

    errors = Counter(e.split(":", 1)[0] for e in table.column("error").drop_null().to_pylist())
    by_status = {v["values"]: v["counts"] for v in pc.value_counts(table.column("status")).to_pylist()}
    stage_rows, stage_seconds = {}, {}
    timings = table.column("timings")
    for stage in STAGES:
        seconds = pc.struct_field(timings, stage)
        if seconds.null_count < len(seconds):
            stage_rows[stage] = len(seconds) - seconds.null_count
            stage_seconds[stage] = pc.sum(seconds).as_py()
    return WriteSummary(
        rows=table.num_rows, flagged=count("privacy_flag"),
        triplets=table.num_rows - table.column("private_caption").null_count,
        metadata_removed=count("metadata_removed"), by_status=by_status, errors_by_stage=dict(errors),
        stage_rows=stage_rows, stage_seconds=stage_seconds,
    )  # fmt: skip


def finalize(table: pa.Table) -> pa.Table:
    """Rows that reach the sink without a final status are failed, never published as if safe."""
    unfinished = pc.is_null(table.column("status"))
    if not pc.any(unfinished).as_py():
        return table
    status = pc.if_else(unfinished, Status.ERROR.value, table.column("status"))
    error = pc.if_else(unfinished, UNFINISHED, table.column("error"))
    table = table.set_column(table.schema.get_field_index("status"), "status", status)
    return table.set_column(table.schema.get_field_index("error"), "error", error)


def safe_projection(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """The safe table's rows: only `kept` and `edited` rows publish an image, error rows no caption."""
    status = table.column("status")
    published = pc.is_in(status, value_set=pa.array(PUBLISHED))
    image = table.column("image")
    caption = table.column("public_caption")
    columns = {
        "image": pc.if_else(published, image, pa.nulls(len(image), image.type)),
        "public_caption": pc.if_else(
            pc.equal(status, Status.ERROR.value), pa.nulls(len(caption), pa.string()), caption
        ),
    }
    return pa.table([columns.get(name, table.column(name)) for name in schema.names], schema=schema)


def prepare_outputs(output: OutputConfig, storage: StorageConfig, resume: bool = False) -> bool:
    """Check both output locations, then make them ready; returns whether they already held data.

    Both are checked first (:func:`~u2s.io.storage.check_output_location`: the bucket exists, a probe
    object can be written and deleted), so a misspelt bucket fails with
    :class:`~u2s.io.storage.OutputUnavailable` before anything is written or deleted; no bucket is ever
    created. Without ``resume`` a non-empty output fails fast (or is emptied with ``output.overwrite``:
    its objects are deleted, never its bucket); with ``resume`` existing files stay (the caller
    reconciles them). Local folders are made; object storage needs none.
    """
    uris = (output.uri, output.sensitive_uri)
    for uri in uris:
        check_output_location(uri, storage)
    existing = False
    for uri in uris:
        fs, path = filesystem(uri, storage)
        fs.invalidate_cache(path)
        if fs.exists(path) and fs.ls(path):
            existing = True
            if resume:
                continue
            if not output.overwrite:
                raise OutputExistsError(
                    f"{uri} is not empty: pass --resume to continue an interrupted run there, or set "
                    "output.overwrite=true to replace it"
                )
            logger.warning("output.overwrite: replacing %s (deleting its %d existing file(s))", uri,
                           len(fs.find(path)))  # fmt: skip
            if is_local(uri):
                fs.rm(path, recursive=True)
            else:  # the objects under the prefix; a recursive rm of a bare bucket would delete the bucket
                objects = fs.find(path)
                if objects:
                    fs.rm(objects)
                fs.invalidate_cache(path)
        make_dirs(uri, storage)
    return existing and resume


class _ParquetFile:
    """One output file being written: a hidden temporary name on local disk, renamed on close."""

    def __init__(self, uri: str, name: str, schema: pa.Schema, output: OutputConfig, storage: StorageConfig):
        self.fs, root = arrow_filesystem(uri, storage)
        self.final = f"{root.rstrip('/')}/{name}"
        # S3 objects appear whole on close; a local file is renamed into place once complete.
        self.path = f"{root.rstrip('/')}/.{name}.tmp" if is_local(uri) else self.final
        self.stream = self.fs.open_output_stream(self.path)
        compression = None if output.compression == "none" else output.compression
        self.writer = pq.ParquetWriter(self.stream, schema, compression=compression)

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table, row_group_size=max(1, table.num_rows))

    def commit(self) -> None:
        self.writer.close()
        self.stream.close()
        if self.path != self.final:
            self.fs.move(self.path, self.final)


class _PairWriter:
    """Streams working rows into file pairs (sensitive + safe) of bounded rows and bytes."""

    def __init__(self, sink: SafeAndSensitiveDatasink, base: str) -> None:
        self.sink = sink
        self.base = base
        self.index = 0
        self.buffer: list[tuple[pa.Table, pa.Table]] = []
        self.buffered_rows = self.buffered_bytes = 0
        self.file_rows = self.file_bytes = 0
        self.files: tuple[_ParquetFile, _ParquetFile] | None = None

    def add(self, table: pa.Table) -> None:
        output = self.sink.output
        safe = safe_projection(table, self.sink.safe_schema)
        sensitive = table.select(SENSITIVE_SCHEMA.names).cast(SENSITIVE_SCHEMA)
        row_bytes = max(1, (safe.nbytes + sensitive.nbytes) // max(1, table.num_rows))
        while safe.num_rows:
            room_rows = output.rows_per_file - self.file_rows - self.buffered_rows
            room_bytes = output.max_file_bytes - self.file_bytes - self.buffered_bytes
            take = max(1, min(room_rows, room_bytes // row_bytes))
            part = (safe.slice(0, take), sensitive.slice(0, take))
            safe, sensitive = safe.slice(take), sensitive.slice(take)
            self.buffer.append(part)
            self.buffered_rows += part[0].num_rows
            self.buffered_bytes += part[0].nbytes + part[1].nbytes
            if self.buffered_bytes >= output.row_group_bytes:
                self._flush()
            if self.file_rows + self.buffered_rows >= output.rows_per_file or (
                self.file_bytes + self.buffered_bytes >= output.max_file_bytes
            ):
                self.commit()

    def _flush(self) -> None:
        if not self.buffer:
            return
        if self.files is None:
            name = f"{self.base}-{self.index:03d}.parquet"
            output, storage = self.sink.output, self.sink.storage
            self.files = (
                _ParquetFile(output.sensitive_uri, name, SENSITIVE_SCHEMA, output, storage),
                _ParquetFile(output.uri, name, self.sink.safe_schema, output, storage),
            )
        sensitive_file, safe_file = self.files
        sensitive_file.write(pa.concat_tables([sensitive for _, sensitive in self.buffer]))
        safe_file.write(pa.concat_tables([safe for safe, _ in self.buffer]))
        self.file_rows += self.buffered_rows
        self.file_bytes += self.buffered_bytes
        self.buffer, self.buffered_rows, self.buffered_bytes = [], 0, 0

    def commit(self) -> None:
        """Close the current pair: the sensitive file first, then its safe twin (the commit record)."""
        self._flush()
        if self.files is None:
            return
        sensitive_file, safe_file = self.files
        sensitive_file.commit()
        safe_file.commit()
        self.files, self.file_rows, self.file_bytes = None, 0, 0
        self.index += 1
        self.sink.fault_after_commit()


#: Finished blocks wait in the object store until a write task's bundle is full, charged to the budget
#: Ray Data gives the stage before the write; a bundle is kept to this share of the cluster's store so
#: that it fills well within that budget (which is itself a share of the store split over every stage).
#: With 256 MiB bundles, a 512 MiB store held 446 finished blocks and no write had started after 68 min.
STORE_SHARE_PER_WRITE = 16


def write_bundle_bytes(output: OutputConfig) -> int:
    """Bytes of rows Ray Data bundles for one write task: ``max_file_bytes``, capped at
    1/:data:`STORE_SHARE_PER_WRITE` of the cluster's object store (read on the driver, when Ray is up)."""
    import ray

    store = ray.cluster_resources().get("object_store_memory", 0) if ray.is_initialized() else 0
    if not store:
        return output.max_file_bytes
    return max(1, min(output.max_file_bytes, int(store) // STORE_SHARE_PER_WRITE))


class SafeAndSensitiveDatasink(Datasink[dict]):
    """Ray Data datasink writing the safe table and the sensitive table as Parquet (see the module doc)."""

    def __init__(self, output: OutputConfig, storage: StorageConfig) -> None:
        self.output = output
        self.storage = storage
        self.safe_schema = safe_schema(output.publish)
        self.summary = WriteSummary()
        self.bundle_bytes = write_bundle_bytes(output)
        # The fault hook is read on the driver and travels with the sink to the write tasks.
        self._fault_mode, _, self._fault_marker = os.environ.get(FAULT_AFTER_COMMIT, "").partition(":")

    @property
    def min_bytes_per_write(self) -> int:
        return self.bundle_bytes

    def get_name(self) -> str:
        return "SafeAndSensitive"

    def write(self, blocks, ctx) -> dict[str, Any]:
        from ray.data._internal.planner.plan_write_op import WRITE_UUID_KWARG_NAME

        # The same write id and task index on every retry of this task: the same file names.
        writer = _PairWriter(self, f"part-{ctx.kwargs[WRITE_UUID_KWARG_NAME]}-{ctx.task_idx:06d}")
        summary = WriteSummary()
        if self._fault_mode == "hang" and os.path.exists(self._fault_marker):
            time.sleep(_HANG_SECONDS)
        try:
            for block in blocks:
                table = BlockAccessor.for_block(block).to_arrow()
                if not table.num_rows:
                    continue
                table = finalize(table.select(WORKING_SCHEMA.names))
                summary.add(summarize(table))
                writer.add(table)
            writer.commit()
        except Exception as e:
            if is_transient(e):  # Ray Data retries the whole write: the same names, so no duplicates
                raise TransientStorageError(type(e).__name__) from None
            raise
        return asdict(summary)

    def fault_after_commit(self) -> None:
        """The test-only fault hook (see :data:`FAULT_AFTER_COMMIT`)."""
        if not self._fault_marker:
            return
        try:
            os.close(os.open(self._fault_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            first = True
        except FileExistsError:
            first = False
        if self._fault_mode == "exit" and first:
            logger.warning("fault hook: exiting this write task's worker after a commit")
            os._exit(1)
        if self._fault_mode == "hang":
            time.sleep(_HANG_SECONDS)

    def on_write_complete(self, write_result) -> None:
        for returned in write_result.write_returns:
            self.summary.add(returned)


def parquet_files(uri: str, storage: StorageConfig) -> list[str]:
    """Names of the committed Parquet files directly under ``uri`` (hidden/temporary ones excluded)."""
    fs, path = filesystem(uri, storage)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    names = (entry.rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False))
    return sorted(name for name in names if name.endswith(".parquet") and not name.startswith((".", "_")))


def read_columns(uri: str, storage: StorageConfig, columns: list[str]) -> pa.Table:
    """Only ``columns`` of every committed Parquet file under ``uri`` (an empty table when none)."""
    import pyarrow.dataset as pads

    fs, root = arrow_filesystem(uri, storage)
    files = [f"{root.rstrip('/')}/{name}" for name in parquet_files(uri, storage)]
    if not files:
        return pa.table({name: pa.array([], WORKING_SCHEMA.field(name).type) for name in columns})
    return pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=columns)

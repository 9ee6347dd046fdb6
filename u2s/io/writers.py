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
  which ``--resume`` deletes. An S3 object appears whole or not at all (a multipart upload completed on
  commit, aborted on error); local files are written under a hidden temporary name and renamed.
- **No debris.** A write task first deletes every file of an earlier attempt of itself (its name prefix,
  both tables), so a retry that splits its rows differently leaves none of the first attempt's files;
  ``--resume`` deletes files without a valid Parquet footer, with their twins (:func:`remove_broken_files`).
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
from functools import partial
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

#: Test-only fault hook, ``<mode>:<marker>``: the first write task to commit a file pair creates the
#: marker file, then ``exit`` ends its worker at once (``os._exit``, as a spot preemption would; Ray
#: re-runs the task) and ``hang`` stops it, and every write task after it, before writing more (so a test
#: can kill the driver with exactly one file pair committed). ``exit-mid-file`` and ``fail-mid-file`` fire
#: in the first write task to have written a row group of a pair it has not committed: the worker exits,
#: or the task fails (a non-transient error), with both files half written; the marker holds the task's
#: file name prefix.
FAULT_AFTER_COMMIT = "U2S_FAULT_AFTER_COMMIT"
_HANG_SECONDS = 3600
MID_FILE_MODES = ("exit-mid-file", "fail-mid-file")

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
    """One output file being written, committed explicitly or discarded: never half there.

    Local files are written under a hidden temporary name and renamed on commit. S3 objects go through
    s3fs without autocommit: the bytes travel as a multipart upload that :meth:`commit` completes and
    :meth:`discard` aborts, so no error path (nor a collected stream) publishes a partial object.
    """

    def __init__(self, uri: str, name: str, schema: pa.Schema, output: OutputConfig, storage: StorageConfig):
        self.fs, root = filesystem(uri, storage)
        self.final = f"{root.rstrip('/')}/{name}"
        self.local = is_local(uri)
        self.path = f"{root.rstrip('/')}/.{name}.tmp" if self.local else self.final
        if self.local:
            self.stream = self.fs.open(self.path, "wb")
        else:
            self.stream = self.fs.open(self.path, "wb", autocommit=False)
            self.fs.transaction.files.remove(self.stream)  # fsspec lists it for a transaction: none here
        compression = None if output.compression == "none" else output.compression
        self.writer = pq.ParquetWriter(self.stream, schema, compression=compression)

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table, row_group_size=max(1, table.num_rows))

    def commit(self) -> None:
        self.writer.close()  # the footer
        self.stream.close()
        if self.local:
            self.fs.mv(self.path, self.final)
        else:
            self.stream.commit()  # completes the multipart upload: the object appears whole

    def discard(self) -> None:
        """Drop the file after an error: no footer is written, nothing appears under the final name."""
        self.writer.is_open = False  # a collected writer would write its footer and close the stream
        try:
            if self.local:
                self.stream.close()
                self.fs.rm(self.path)
            else:
                self.stream.discard()  # aborts the multipart upload
                self.stream.closed = True  # a collected file would flush its buffer on close
        except Exception as e:  # best effort: a dead connection leaves an aborted or invisible upload
            logger.warning("could not discard an unfinished output file (%s)", type(e).__name__)


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
        self.sink.fault_mid_file(self.base, self.files)

    def discard(self) -> None:
        """Drop the pair being written (after an error): nothing of it appears under a final name."""
        if self.files is not None:
            for file in self.files:
                file.discard()
        self.files = None

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
        self.error_budget: Any = None  # set by the run: a u2s.error_budget.ErrorBudget
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
        base = f"part-{ctx.kwargs[WRITE_UUID_KWARG_NAME]}-{ctx.task_idx:06d}"
        writer = _PairWriter(self, base)
        summary = WriteSummary()
        if self._fault_mode == "hang" and os.path.exists(self._fault_marker):
            time.sleep(_HANG_SECONDS)
        try:
            # An earlier attempt of this task may have split its rows differently: none of its files stay.
            remove_task_files(self.output, self.storage, base)
            for block in blocks:
                table = BlockAccessor.for_block(block).to_arrow()
                if not table.num_rows:
                    continue
                table = finalize(table.select(WORKING_SCHEMA.names))
                summary.add(summarize(table))
                if self.error_budget is not None:  # the run's tally (u2s.error_budget): progress, and
                    self.error_budget.report(table)  # run.max_error_fraction stops a run that mostly fails
                writer.add(table)
            writer.commit()
        except BaseException as e:
            writer.discard()
            if not isinstance(e, Exception):
                raise
            if is_transient(e):  # Ray Data retries the whole write: the same names, so no duplicates
                raise TransientStorageError(type(e).__name__) from None
            raise
        return asdict(summary)

    def fault_after_commit(self) -> None:
        """The test-only fault hook (see :data:`FAULT_AFTER_COMMIT`)."""
        if self._fault_mode not in ("exit", "hang"):
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

    def fault_mid_file(self, base: str, files: tuple[_ParquetFile, _ParquetFile] | None) -> None:
        """The test-only mid-file modes of the fault hook (see :data:`FAULT_AFTER_COMMIT`)."""
        if self._fault_mode not in MID_FILE_MODES or files is None:
            return
        try:
            fd = os.open(self._fault_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, base.encode())
        os.close(fd)
        for file in files:  # the bytes so far leave the process (as far as the store takes them)
            file.stream.flush()
        if self._fault_mode == "exit-mid-file":
            logger.warning("fault hook: exiting this write task's worker mid-file")
            os._exit(1)
        raise RuntimeError("fault hook: a write task failed mid-file")

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


def remove_task_files(output: OutputConfig, storage: StorageConfig, base: str) -> int:
    """Delete what an earlier attempt of one write task left: its files ``{base}-*.parquet`` and local
    temporaries, in the safe table first (a safe file never outlives its sensitive twin). Returns how
    many were deleted (none on a first attempt, which costs one prefix listing per table)."""
    removed = 0
    for uri in (output.uri, output.sensitive_uri):
        fs, root = filesystem(uri, storage)
        root = root.rstrip("/")
        if is_local(uri):
            paths = fs.glob(f"{root}/{base}-*.parquet") + fs.glob(f"{root}/.{base}-*.tmp")
        else:
            fs.invalidate_cache(root)
            paths = fs.find(root, maxdepth=1, prefix=f"{base}-")
        if paths:
            fs.rm(paths)
            removed += len(paths)
    if removed:
        logger.info("removed %d file(s) of an earlier attempt of this write task", removed)
    return removed


def _has_footer(fs: Any, path: str) -> bool:
    """Whether ``path`` ends in a readable Parquet footer (its metadata parses)."""
    try:
        with fs.open(path, "rb") as f:
            pq.read_metadata(f)
        return True
    except Exception as e:
        if is_transient(e):
            raise
        return False


def remove_broken_files(output: OutputConfig, storage: StorageConfig, threads: int = 16) -> int:
    """Delete every file of either table without a valid Parquet footer, and its twin in the other table
    (its rows are not committed); returns how many names were broken. Footers are read in ``threads``."""
    from concurrent.futures import ThreadPoolExecutor

    broken: set[str] = set()
    for uri in (output.uri, output.sensitive_uri):
        fs, root = filesystem(uri, storage)
        names = parquet_files(uri, storage)
        paths = [f"{root.rstrip('/')}/{name}" for name in names]
        with ThreadPoolExecutor(threads) as pool:
            valid = list(pool.map(partial(_has_footer, fs), paths))
            broken.update(name for name, ok in zip(names, valid, strict=True) if not ok)
    for uri in (output.uri, output.sensitive_uri):  # the safe file, the commit record, goes first
        fs, root = filesystem(uri, storage)
        present = set(parquet_files(uri, storage))
        paths = [f"{root.rstrip('/')}/{name}" for name in sorted(broken & present)]
        if paths:
            fs.rm(paths)
    if broken:
        logger.warning("removed %d file pair(s) without a valid Parquet footer", len(broken))
    return len(broken)


def read_columns(uri: str, storage: StorageConfig, columns: list[str]) -> pa.Table:
    """Only ``columns`` of every committed Parquet file under ``uri`` (an empty table when none)."""
    import pyarrow.dataset as pads

    fs, root = arrow_filesystem(uri, storage)
    files = [f"{root.rstrip('/')}/{name}" for name in parquet_files(uri, storage)]
    if not files:
        return pa.table({name: pa.array([], WORKING_SCHEMA.field(name).type) for name in columns})
    return pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=columns)


# ---------------------------------------------------------------- counting the outputs


def id_digest(ids: list[str], sources: list[str] | None = None) -> int:
    """Order-independent digest of ids (or of ``(id, source)`` pairs, as the listing's fingerprint is):
    the sum of their 64-bit BLAKE2b hashes, modulo 2**64. A doubled row and a missing one change it."""
    import hashlib

    total = 0
    keys = ids if sources is None else (f"{i}\0{s}" for i, s in zip(ids, sources, strict=True))
    for key in keys:
        total += int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    return total & 0xFFFFFFFFFFFFFFFF


@dataclass
class TableCounts:
    """What a table holds, counted where its files are read: rows, digests and (sensitive) the run's
    counts. Nothing private: ids and sources only enter the digests."""

    rows: int = 0
    ids: int = 0  #: :func:`id_digest` of the ids
    pairs: int = 0  #: :func:`id_digest` of (id, source), comparable with the listing's fingerprint
    multi_frame: int = 0
    summary: WriteSummary = field(default_factory=WriteSummary)

    def add(self, other: TableCounts) -> None:
        self.rows += other.rows
        self.ids = (self.ids + other.ids) & 0xFFFFFFFFFFFFFFFF
        self.pairs = (self.pairs + other.pairs) & 0xFFFFFFFFFFFFFFFF
        self.multi_frame += other.multi_frame
        self.summary.add(other.summary)


#: The sensitive columns the run's counts need (never images; captions only as null counts).
COUNTED_COLUMNS = ["id", "source", "status", "error", "privacy_flag", "private_caption", "metadata_removed",
                   "frames", "timings"]  # fmt: skip


def _count_files(uri: str, storage: StorageConfig, names: list[str], sensitive: bool) -> TableCounts:
    """Counts of some files of one table (a Ray task: their rows never reach the driver)."""
    import pyarrow.dataset as pads

    try:
        fs, root = arrow_filesystem(uri, storage)
        files = [f"{root.rstrip('/')}/{name}" for name in names]
        columns = COUNTED_COLUMNS if sensitive else ["id"]
        table = pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=columns)
    except Exception as e:
        if is_transient(e):
            raise TransientStorageError(type(e).__name__) from None
        raise
    ids = table.column("id").to_pylist()
    counts = TableCounts(rows=table.num_rows, ids=id_digest(ids))
    if sensitive:
        counts.pairs = id_digest(ids, table.column("source").to_pylist())
        counts.summary = summarize(table)
        counts.multi_frame = pc.sum(pc.fill_null(pc.greater(table.column("frames"), 1), False)).as_py() or 0
    return counts


def count_outputs(
    output: OutputConfig, storage: StorageConfig, files_per_task: int = 16
) -> tuple[TableCounts, TableCounts]:
    """(safe, sensitive) counts of the committed files, read in Ray tasks of ``files_per_task`` files:
    the driver holds only the counts, whatever the tables' size."""
    import ray

    task = ray.remote(_count_files).options(
        num_cpus=0.25, max_retries=storage.task_retries, retry_exceptions=[TransientStorageError]
    )
    refs: dict[bool, list] = {}
    for uri, sensitive in ((output.uri, False), (output.sensitive_uri, True)):
        names = parquet_files(uri, storage)
        refs[sensitive] = [task.remote(uri, storage, names[i : i + files_per_task], sensitive)
                           for i in range(0, len(names), files_per_task)]  # fmt: skip
    totals = (TableCounts(), TableCounts())
    for sensitive, total in zip((False, True), totals, strict=True):
        for counts in ray.get(refs[sensitive]):
            total.add(counts)
    return totals

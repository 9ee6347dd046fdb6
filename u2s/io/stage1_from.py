"""``input.stage1_from``: a run that takes stage 1's results from an earlier run's sensitive table and only
edits (a fine-tuned editor's re-run, editor comparisons): no VLM or LLM is loaded.

The earlier run's sensitive table *is* the listing. Ray tasks read its files (one task a file: ids,
sources, labels, statuses and the stage-1 columns, never an image) into manifest tables that stay in the
object store, so ids, sources and the input fingerprint are the earlier run's. Rows with a stage-1 result
(kept or edited there, or failed only in stage 2) are fetched from their ``source`` with the earlier run's
input layout (format, image column...), decoded, and carry their results to this run's editor: unflagged
rows are kept, flagged ones edited. Rows without one (they failed in read, decode or stage 1) skip the
fetch and stay error rows, :data:`NO_RESULT`; ``--retry-errors`` cannot fix them here, only a run of
stage 1 can.

The earlier run must have finished (its last attempt ``succeeded``: exactly once, no uncommitted files).
Its identity (:class:`SourceRun`: URI, fingerprints, when it finished, its input layout) goes into this
run's full record, and ``--resume`` is refused when it changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import ValidationError

from u2s.config import InputConfig, Resources, StorageConfig, format_validation_error
from u2s.io.errors import InputError
from u2s.io.listing import Listing, _fingerprint, _limit
from u2s.io.readers import MANIFEST_SCHEMA
from u2s.io.storage import TransientStorageError, arrow_filesystem, is_transient, read_json, uri_join
from u2s.schema import WORKING_SCHEMA, Status

if TYPE_CHECKING:
    import ray.data

#: What stage 1 writes on a row, carried from the earlier run's sensitive table to this run's editor.
STAGE1_COLUMNS = ("privacy_flag", "categories", "review", "private_caption", "public_caption",
                  "edit_instruction", "combined_caption", "flagged_frame")  # fmt: skip
#: The error of a row that has no stage-1 result in the earlier run (content-free: it is published).
NO_RESULT = "stage1-from: no stage-1 result in the source run"
#: Stages after stage 1: a row that failed in one of them has its stage-1 result whole.
_STAGE2 = ("edit", "verify")
#: What the fetch makes of a manifest ``error`` of :data:`NO_RESULT` (a row it does not fetch).
_NOT_FETCHED = f"read: {NO_RESULT}"
_READ_COLUMNS = ["id", "source", "label", "status", "error", *STAGE1_COLUMNS]


@dataclass(frozen=True)
class SourceRun:
    """The earlier run a ``stage1_from`` run reads: where, which settings and input, when it finished."""

    uri: str
    config_fingerprint: str
    input_fingerprint: str
    finished: str | None
    input: InputConfig  # its input layout: how its rows' sources are read

    def record(self) -> dict[str, Any]:
        """What this run's full ``_run.json`` keeps of it (``--resume`` compares it)."""
        return {"uri": self.uri, "config_fingerprint": self.config_fingerprint,
                "input_fingerprint": self.input_fingerprint, "finished": self.finished,
                "input": self.input.model_dump(mode="json")}  # fmt: skip


def source_run(uri: str, storage: StorageConfig) -> SourceRun:
    """The finished run whose sensitive table is at ``uri``, from its full record; :class:`InputError`
    when there is none or it did not finish."""
    record = read_json(uri_join(uri, "_run.json"), storage)
    if not isinstance(record, dict) or "config" not in record:
        raise InputError(
            f"input.stage1_from: no run record at {uri}/_run.json (the sensitive output of a u2s run)"
        )
    attempts = record.get("attempts") or [{}]
    last = attempts[-1]
    if last.get("status") != "succeeded":
        raise InputError(
            f"input.stage1_from: the run at {uri} did not finish (its last attempt: {last.get('status')}); "
            "finish it with --resume first"
        )
    earlier = record.get("stage1_from")  # a run that read another one: that one's layout holds
    recorded = earlier["input"] if isinstance(earlier, dict) else record["config"]["input"]
    layout = {k: v for k, v in recorded.items() if k in InputConfig.model_fields}  # as this version reads it
    layout.update(stage1_from=None, id_key_from=None, limit=None)
    try:
        input = InputConfig.model_validate(layout)
    except ValidationError as e:
        problems = format_validation_error(e, InputConfig)
        raise InputError(f"input.stage1_from: the run's recorded input settings: {problems}") from None
    return SourceRun(
        uri=uri, config_fingerprint=record.get("config_fingerprint", ""),
        input_fingerprint=record.get("input_fingerprint", ""), finished=last.get("finished"), input=input,
    )  # fmt: skip


def adopt_id_key(source: SourceRun, sensitive_uri: str, storage: StorageConfig) -> None:
    """The earlier run's id key (if it has one) beside this run's sensitive table: the ids are its ids,
    and a later run's ``input.id_key_from`` or ``stage1_from`` may name this output."""
    from u2s.io.ids import read_id_key, write_id_key

    key = read_id_key(source.uri, storage)
    if key is not None:
        write_id_key(sensitive_uri, storage, key)


def _has_result(status: list[str | None], errors: list[str | None]) -> list[bool]:
    return [
        s in (Status.KEPT.value, Status.EDITED.value)
        or (s == Status.ERROR.value and (e or "").split(":", 1)[0] in _STAGE2)
        for s, e in zip(status, errors, strict=True)
    ]


def _list_file(
    file_uri: str, layout: InputConfig, storage: StorageConfig
) -> tuple[pa.Table, tuple[int, int]]:
    """One sensitive file → manifest rows with their stage-1 columns (rows without a stage-1 result: the
    ``error`` :data:`NO_RESULT`, so they are not fetched) and ``(rows, fingerprint)``; runs in a Ray task."""
    import pyarrow.parquet as pq

    try:
        afs, path = arrow_filesystem(file_uri, storage)
        table = pq.read_table(path, columns=_READ_COLUMNS, filesystem=afs)
    except Exception as e:
        if is_transient(e):  # Ray re-runs the task (storage.task_retries)
            raise TransientStorageError(type(e).__name__) from None
        raise
    ids, sources = table.column("id").to_pylist(), table.column("source").to_pylist()
    n = table.num_rows
    parts: list[str | None] = [None] * n
    rows: list[int | None] = [None] * n
    if layout.format in ("parquet", "webdataset"):  # `<file>#<row>`, `<shard>#<key>` (a whole file: none)
        split = [source.rsplit("#", 1) if "#" in source else (source, None) for source in sources]
        parts = [part for part, _ in split]
        if layout.format == "parquet":
            rows = [int(tail) if tail and tail.isdigit() else None for _, tail in split]
    has = _has_result(table.column("status").to_pylist(), table.column("error").to_pylist())
    columns = [
        table.column("id"), table.column("source"), table.column("label"), pa.array(parts, pa.string()),
        pa.array(rows, pa.int64()), pa.array([None if ok else NO_RESULT for ok in has], pa.string()),
    ]  # fmt: skip
    columns += [table.column(name).cast(WORKING_SCHEMA.field(name).type) for name in STAGE1_COLUMNS]
    fields = [*MANIFEST_SCHEMA, *(WORKING_SCHEMA.field(name) for name in STAGE1_COLUMNS)]
    return pa.table(columns, schema=pa.schema(fields)), (n, _fingerprint(ids, sources))


def list_stage1_from(input: InputConfig, storage: StorageConfig, resources: Resources) -> Listing:
    """The listing of a ``stage1_from`` run: the earlier run's rows (``input.limit``: the first ones) with
    their stage-1 columns, listed in Ray tasks; ``Listing.stage1_from`` is that run. Its fingerprint covers
    ``(id, source)`` like any listing's."""
    import ray
    import ray.data

    from u2s.io.writers import parquet_files

    uri = input.stage1_from
    if not uri:
        raise ValueError("list_stage1_from needs input.stage1_from")
    source = source_run(uri, storage)
    names = parquet_files(uri, storage)
    if not names:
        raise InputError(f"input.stage1_from: no Parquet files in {uri}")
    task = ray.remote(_list_file).options(
        num_returns=2, num_cpus=resources.num_cpus, max_retries=storage.task_retries,
        retry_exceptions=[TransientStorageError],
    )  # fmt: skip
    parts = [task.remote(uri_join(uri, name), source.input, storage) for name in names]
    refs = [table for table, _ in parts]
    sizes = ray.get([size for _, size in parts])
    counts, prints = [rows for rows, _ in sizes], [print_ for _, print_ in sizes]
    if input.limit is not None:
        refs, counts, prints = _limit(refs, counts, prints, input.limit)
    rows = sum(counts)
    total = sum(prints) % 2**64
    return Listing(
        dataset=ray.data.from_arrow_refs(refs), rows=rows, fingerprint=f"{rows}:{total:016x}",
        skipped_extensions={}, unreadable_files=0, unreadable_records=0, shards=len(refs), stage1_from=source,
    )  # fmt: skip


def read_stage1_from(
    listing: Listing, storage: StorageConfig, resources: Resources, done: Any = None
) -> ray.data.Dataset:
    """Working rows of a ``stage1_from`` listing (lazy): rows with a stage-1 result fetched from their
    sources (as the earlier run's input layout says) with that result on them; the others are not fetched
    (their manifest ``error`` is set). ``done``: ids to skip (``--resume``), before any byte is fetched."""
    from u2s.io.readers import fetch

    source: SourceRun = listing.stage1_from
    return fetch(listing.dataset, source.input, storage, resources, done)


def apply_stage1_results(batch: pa.Table) -> pa.Table:
    """After decode, what stage 1 would do: rows the earlier run did not flag end as ``kept``; rows it has
    no result for get their reason, :data:`NO_RESULT` (the fetch names it a read error)."""
    status, error = batch.column("status"), batch.column("error")
    unflagged = pc.and_(pc.is_null(status), pc.equal(pc.fill_null(batch.column("privacy_flag"), True), False))
    missing = pc.fill_null(pc.equal(error, _NOT_FETCHED), False)
    if pc.any(unflagged).as_py():
        status = pc.if_else(unflagged, Status.KEPT.value, status)
        batch = batch.set_column(batch.schema.get_field_index("status"), "status", status)
    if pc.any(missing).as_py():
        error = pc.if_else(missing, NO_RESULT, error)
        batch = batch.set_column(batch.schema.get_field_index("error"), "error", error)
    return batch

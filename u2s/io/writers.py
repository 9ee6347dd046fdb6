"""Sinks: the safe dataset and the sensitive triplets, written in one streaming pass.

A Ray Dataset executes once per consumption, so writing two tables with two `write_parquet` calls
would run every model twice. :class:`SafeAndTripletsDatasink` instead splits each block inside the
same write task: the safe projection (no private text) goes to ``output.uri``, flagged rows' sensitive
columns go to ``output.sensitive_uri``. Each write task returns counts that the driver aggregates
into the run record.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasink  # this module is imported only by the pipeline, never by the CLI's import
from ray.data.block import BlockAccessor

from u2s.config import OutputConfig, StorageConfig
from u2s.io.storage import arrow_filesystem, filesystem, uri_join
from u2s.schema import SAFE_SCHEMA, STAGES, TRIPLETS_SCHEMA, WORKING_SCHEMA, Status, mark_error


class OutputExistsError(FileExistsError):
    """An output location already holds data and `output.overwrite` is false."""


@dataclass
class WriteSummary:
    """What the write tasks report, summed over the whole job."""

    rows: int = 0
    triplets: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    errors_by_stage: dict[str, int] = field(default_factory=dict)
    stage_rows: dict[str, int] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def add(self, other: dict[str, Any]) -> None:
        self.rows += other["rows"]
        self.triplets += other["triplets"]
        for name in ("by_status", "errors_by_stage", "stage_rows", "stage_seconds"):
            mine = getattr(self, name)
            for key, value in other[name].items():
                mine[key] = mine.get(key, 0) + value


def prepare_outputs(output: OutputConfig, storage: StorageConfig) -> None:
    """Fail fast if an output holds data (unless overwrite), else clear it; then create both folders."""
    for uri in (output.uri, output.sensitive_uri):
        fs, path = filesystem(uri, storage)
        if fs.exists(path) and fs.ls(path):
            if not output.overwrite:
                raise OutputExistsError(f"{uri} is not empty; set output.overwrite=true to replace it")
            fs.rm(path, recursive=True)
        fs.makedirs(path, exist_ok=True)


def finalize_row(row: dict) -> None:
    """Rows that reach the sink unprocessed are failed, never published as if safe."""
    if row["status"] is None:
        mark_error(row, "pipeline", "row left every stage without a final status")


def safe_record(row: dict) -> dict:
    """The safe projection of a row. Only `kept` and `edited` rows publish an image."""
    record = {name: row[name] for name in SAFE_SCHEMA.names}
    if row["status"] not in (Status.KEPT.value, Status.EDITED.value):
        record["image"] = None
    if row["status"] == Status.ERROR.value:
        record["public_caption"] = None  # an unfinished row publishes no description of its content
    return record


def _summarize(rows: list[dict], triplets: int) -> dict[str, Any]:
    by_status = Counter(row["status"] for row in rows)
    errors = Counter(row["error"].split(":", 1)[0] for row in rows if row["error"])
    stage_rows: Counter[str] = Counter()
    stage_seconds: Counter[str] = Counter()
    for row in rows:
        for stage in STAGES:
            seconds = (row["timings"] or {}).get(stage)
            if seconds is not None:
                stage_rows[stage] += 1
                stage_seconds[stage] += seconds
    return {"rows": len(rows), "triplets": triplets, "by_status": dict(by_status),
            "errors_by_stage": dict(errors), "stage_rows": dict(stage_rows),
            "stage_seconds": dict(stage_seconds)}  # fmt: skip


class SafeAndTripletsDatasink(Datasink[dict]):
    """Ray Data datasink writing the safe table and the triplets table as Parquet."""

    def __init__(self, output: OutputConfig, storage: StorageConfig) -> None:
        self.output = output
        self.storage = storage
        self.summary = WriteSummary()

    @property
    def min_rows_per_write(self) -> int:
        return self.output.rows_per_file

    def get_name(self) -> str:
        return "SafeAndTriplets"

    def write(self, blocks, ctx) -> dict[str, Any]:
        tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
        tables = [t for t in tables if t.num_rows]
        rows = (
            pa.concat_tables([t.select(WORKING_SCHEMA.names) for t in tables]).to_pylist() if tables else []
        )
        for row in rows:
            finalize_row(row)
        sensitive = [{n: row[n] for n in TRIPLETS_SCHEMA.names} for row in rows if row["privacy_flag"]]
        name = f"part-{ctx.task_idx:05d}-{uuid.uuid4().hex[:8]}.parquet"
        if rows:
            self._write_table(self.output.uri, name, [safe_record(r) for r in rows], SAFE_SCHEMA)
        if sensitive:
            self._write_table(self.output.sensitive_uri, name, sensitive, TRIPLETS_SCHEMA)
        return _summarize(rows, len(sensitive))

    def _write_table(self, uri: str, name: str, records: list[dict], schema: pa.Schema) -> None:
        fs, root = arrow_filesystem(uri, self.storage)
        table = pa.Table.from_pylist(records, schema=schema)
        pq.write_table(table, f"{root.rstrip('/')}/{name}", filesystem=fs, compression="zstd")

    def on_write_complete(self, write_result) -> None:
        for returned in write_result.write_returns:
            self.summary.add(returned)


def write_run_record(uri: str, storage: StorageConfig, record: dict[str, Any]) -> str:
    """Write `_run.json` beside the safe table; returns its URI."""
    target = uri_join(uri, "_run.json")
    fs, path = filesystem(target, storage)
    with fs.open(path, "w") as f:
        json.dump(record, f, indent=2, sort_keys=False, default=str)
    return target

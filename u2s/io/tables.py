"""The tables reading passes between its steps: manifest rows (what listing finds, one per input
record) and the working rows a fetch makes of them. Listing, the format modules and the readers all
build on this module; it imports none of them."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from u2s.io.errors import InputError
from u2s.schema import WORKING_SCHEMA, empty_timings

#: One manifest row per input record. ``part``/``row``: the Parquet file and row index holding the
#: record's image (Parquet inputs); ``error``: why the record cannot be read at all (then no fetch).
MANIFEST_SCHEMA = pa.schema(
    [("id", pa.string()), ("source", pa.string()), ("label", pa.string()), ("part", pa.string()),
     ("row", pa.int64()), ("error", pa.string())]
)  # fmt: skip

MASK64 = 2**64 - 1

READ_STAGE = "read"


def fingerprint(ids: list[str], sources: list[str]) -> int:
    """Order-independent digest of ``(id, source)`` pairs: the sum of their 64-bit hashes."""
    total = 0
    for row_id, source in zip(ids, sources, strict=True):
        digest = hashlib.blake2b(f"{row_id}\0{source}".encode(), digest_size=8).digest()
        total += int.from_bytes(digest, "big")
    return total & MASK64


def manifest_table(ids, sources, labels, parts=None, rows=None, errors=None) -> pa.Table:
    n = len(ids)
    return pa.table(
        [pa.array(ids, pa.string()), pa.array(sources, pa.string()), pa.array(labels, pa.string()),
         pa.array(parts if parts is not None else [None] * n, pa.string()),
         pa.array(rows if rows is not None else [None] * n, pa.int64()),
         pa.array(errors if errors is not None else [None] * n, pa.string())],
        schema=MANIFEST_SCHEMA,
    )  # fmt: skip


@dataclass(frozen=True)
class Shard:
    """One unit of listing work: ``kind`` is dir (a local directory), range (S3 keys ``after < key <=
    upto`` below the input's prefix; ``None``: unbounded), folder, files, parquet, coco or manifest."""

    kind: str
    uri: str
    files: tuple[str, ...] = ()
    manifest: Any = None  # a u2s.io.manifest.ManifestFile
    after: str | None = None
    upto: str | None = None


@dataclass
class ShardStats:
    """What a listing task reports besides its table (small: it travels to the driver)."""

    rows: int = 0
    fingerprint: int = 0
    skipped_extensions: dict[str, int] = field(default_factory=dict)
    unreadable_files: int = 0
    unreadable_records: int = 0  # records known (from footers) to exist but not readable
    children: list[Shard] = field(default_factory=list)  # what a dir or range shard left to new tasks
    tables: list[tuple[int, int]] = field(default_factory=list)  # (rows, fingerprint) of each table


def working_table(manifest: pa.Table, contents: list[bytes | None], errors: list[str | None]) -> pa.Table:
    """Working rows for manifest rows: their ids, sources, labels, image bytes (or ``read`` errors), and
    any other working column the manifest holds (an ``input.stage1_from`` listing's stage-1 results)."""
    n = manifest.num_rows
    status = pa.array(["error" if e else None for e in errors], pa.string())
    columns: dict[str, Any] = {
        **{name: manifest.column(name) for name in manifest.column_names if name in WORKING_SCHEMA.names},
        "id": manifest.column("id"),
        "source": manifest.column("source"),
        "label": manifest.column("label"),
        "image": pa.array([{"bytes": c, "path": None} for c in contents], WORKING_SCHEMA.field("image").type),
        "status": status,
        "error": pa.array([f"{READ_STAGE}: {e}" if e else None for e in errors], pa.string()),
        "timings": pa.array([empty_timings()] * n, WORKING_SCHEMA.field("timings").type),
    }
    return pa.table(
        [columns[f.name] if f.name in columns else pa.nulls(n, f.type) for f in WORKING_SCHEMA],
        schema=WORKING_SCHEMA,
    )


def records_by_part(batch: pa.Table) -> Iterator[tuple[str | None, pa.Table]]:
    """Manifest rows of file-backed records (Parquet files, tar shards), grouped for reading: first
    ``(None, working rows)`` of those listing already failed (with their read error), then ``(file uri,
    manifest rows)`` per file, in listing order."""
    failed = pc.is_valid(batch.column("error"))
    if pc.any(failed).as_py():
        broken = batch.filter(failed)
        reasons = [error.removeprefix(f"{READ_STAGE}: ") for error in broken.column("error").to_pylist()]
        yield None, working_table(broken, [None] * broken.num_rows, reasons)
        batch = batch.filter(pc.invert(failed))
    for file_uri in dict.fromkeys(batch.column("part").to_pylist()):
        yield file_uri, batch.filter(pc.equal(batch.column("part"), file_uri))


def image_bytes_getter(dtype: pa.DataType, column: str, uri: str):
    """A function from a cell of the image column to its bytes (HF ``Image`` struct or plain binary)."""
    if pa.types.is_struct(dtype) and dtype.get_field_index("bytes") >= 0:
        return lambda cell: cell.get("bytes") if cell else None
    if pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype) or pa.types.is_binary_view(dtype):
        return lambda cell: cell
    raise InputError(f"column {column!r} in {uri} is {dtype}, not an image struct {{bytes, path}} or binary")

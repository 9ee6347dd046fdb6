"""Rows listed twice, found in Ray tasks before any model runs (a hash partition of the id column).

Ids are the join and resume key, so each must name one record. A manifest can list a URI twice, or an
id column give one id to two records. Each listed table's ``(id, source)`` pairs go to one of
``ceil(rows / PARTITION_ROWS)`` partitions by a hash of the id; a task per partition finds the ids
that name several sources (refused: the caller raises) and the rows that repeat an earlier ``(id,
source)`` pair (dropped: the first in listing order stays). The driver holds only references and
counts: the positions to drop stay in the object store until each table is filtered in a task.
"""

from __future__ import annotations

import math
import zlib
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from u2s.io.tables import fingerprint

if TYPE_CHECKING:
    import ray

#: Rows per partition of the duplicate check (one task's ``(id, source)`` pairs).
PARTITION_ROWS = 2_000_000

#: Most colliding ids an error names.
SHOWN = 5


def _partition(table: pa.Table, offset: int, partitions: int) -> list[pa.Table] | pa.Table:
    """``(id, source, pos)`` of ``table``'s rows (``pos``: the row's place in the listing), split by id."""
    keys = pa.table({
        "id": table.column("id"), "source": table.column("source"),
        "pos": pa.array(range(offset, offset + table.num_rows), pa.int64()),
    })  # fmt: skip
    if partitions == 1:
        return keys
    part = pa.array([zlib.crc32(i.encode()) % partitions for i in table.column("id").to_pylist()])
    return [keys.filter(pc.equal(part, p)) for p in range(partitions)]


def _find(*parts: pa.Table) -> tuple[dict, pa.Array]:
    """One partition: ``{"clashes": first ids naming several sources, "drops": count}`` and the
    positions of the rows that repeat an earlier ``(id, source)``."""
    keys = pa.concat_tables(parts)
    pairs = keys.group_by(["id", "source"], use_threads=False).aggregate([("pos", "min")])
    per_id = pairs.group_by("id", use_threads=False).aggregate([("source", "count")])
    clashes = per_id.filter(pc.greater(per_id.column("source_count"), 1)).column("id")
    shown = sorted(clashes.to_pylist())[:SHOWN]
    positions = keys.column("pos")
    drops = positions.filter(pc.invert(pc.is_in(positions, pairs.column("pos_min")))).combine_chunks()
    return {"clashes": shown, "drops": len(drops)}, drops


def _drop(table: pa.Table, offset: int, *drops: pa.Array) -> tuple[pa.Table, tuple[int, int]]:
    """``table`` without the rows at the given listing positions, and its rows and fingerprint."""

    positions = pa.array(range(offset, offset + table.num_rows), pa.int64())
    dropped = pa.chunked_array(drops, pa.int64()).combine_chunks()
    kept = table.filter(pc.invert(pc.is_in(positions, dropped)))
    return kept, (
        kept.num_rows,
        fingerprint(kept.column("id").to_pylist(), kept.column("source").to_pylist()),
    )


def drop_duplicates(
    table_refs: list[ray.ObjectRef], counts: list[int], fingerprints: list[int], num_cpus: float = 1.0
) -> tuple[list[ray.ObjectRef], list[int], list[int], int, list[str]]:
    """The tables without rows that repeat an earlier ``(id, source)``, their row counts and
    fingerprints, how many rows were dropped, and the first ids (sorted) that name different sources
    (empty when none does)."""
    import ray

    if not table_refs:
        return table_refs, counts, fingerprints, 0, []
    partitions = max(1, math.ceil(sum(counts) / PARTITION_ROWS))
    split = ray.remote(_partition).options(num_cpus=num_cpus, num_returns=partitions)
    offsets = [sum(counts[:i]) for i in range(len(counts))]
    parts = [split.remote(ref, offset, partitions) for ref, offset in zip(table_refs, offsets, strict=True)]
    if partitions == 1:
        parts = [[p] for p in parts]
    find = ray.remote(_find).options(num_cpus=num_cpus, num_returns=2)
    found = [find.remote(*[table_parts[p] for table_parts in parts]) for p in range(partitions)]
    reports = ray.get([report for report, _ in found])
    clashes = sorted(i for report in reports for i in report["clashes"])[:SHOWN]
    dropped = sum(report["drops"] for report in reports)
    if clashes or not dropped:
        return table_refs, counts, fingerprints, 0, clashes
    drop = ray.remote(_drop).options(num_cpus=num_cpus, num_returns=2)
    drop_refs = [positions for _, positions in found]
    kept = [drop.remote(ref, offset, *drop_refs) for ref, offset in zip(table_refs, offsets, strict=True)]
    sizes = ray.get([size for _, size in kept])
    return [table for table, _ in kept], [n for n, _ in sizes], [f for _, f in sizes], dropped, []

"""Send only the rows a call wants to a ray.data.llm processor, keeping every row: checkpointed passes.

A processor sends every row it receives to the model, and Ray Data re-executes the upstream for each
consumer, so splitting a live stream (`filter(wants)` → processor, `union` `filter(not wants)`) would run
the upstream and its models twice. Instead the stream is written to a Parquet checkpoint (working
schema), and the next pass reads that checkpoint twice: the wanted rows go through the processor, the
others pass through untouched, and the two are unioned. A second read costs a Parquet scan, not a model
call. The checkpoint's write tasks also count the wanted rows, so a call with nothing to do starts no
engine at all.

Checkpoints hold private data (captions, instructions), so they live with the sensitive output, under
``{output.sensitive_uri}/_work/<nn>-<call>/``; ``run`` removes them after a successful job unless
``output.keep_work`` is set.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from u2s.io.storage import arrow_filesystem, filesystem, uri_join
from u2s.schema import WORKING_SCHEMA

if TYPE_CHECKING:
    import ray.data

    from u2s.config import OutputConfig, StorageConfig

logger = logging.getLogger(__name__)

Wants = Callable[[dict], bool]

#: CPUs of the light tasks that read a checkpoint and split it into wanted rows and the rest.
SPLIT_CPUS = 0.25
#: Rows per Parquet row group of a checkpoint: reads stream one group at a time (rows hold images).
ROW_GROUP_ROWS = 64


def select_rows(batch: pa.Table, wants: Wants, keep: bool) -> pa.Table:
    """The rows of ``batch`` for which ``wants`` is ``keep`` (rows are judged without their image)."""
    light = batch.select([name for name in batch.column_names if name != "image"]).to_pylist()
    mask = pa.array([bool(wants(row)) is keep for row in light], pa.bool_())
    return batch.filter(mask)


def read_checkpoint_files(
    batch: pa.Table, storage: StorageConfig, wants: Wants | None, keep: bool, batch_rows: int | None
) -> Iterator[pa.Table]:
    """Map task: stream the Parquet files named in ``batch`` as working tables (optionally filtered)."""
    import pyarrow.parquet as pq

    for uri in batch.column("file").to_pylist():
        fs, path = arrow_filesystem(uri, storage)
        with fs.open_input_file(path) as f:
            for record_batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows or ROW_GROUP_ROWS):
                table = pa.Table.from_batches([record_batch]).cast(WORKING_SCHEMA)
                if wants is not None:
                    table = select_rows(table, wants, keep)
                if table.num_rows:
                    yield table


@dataclass(frozen=True)
class Checkpoint:
    """One written pass: where, how many rows, and how many of them the next call wants."""

    uri: str
    rows: int
    wanted: int
    files: tuple[str, ...]


def _checkpoint_sink_cls() -> type:
    from ray.data import Datasink
    from ray.data.block import BlockAccessor

    class CheckpointDatasink(Datasink):
        """Writes working rows as Parquet (exact working schema) and counts the rows ``wants`` accepts."""

        def __init__(self, uri: str, storage: StorageConfig, wants: Wants, rows_per_file: int) -> None:
            self.uri = uri
            self.rows_per_file = rows_per_file
            self.storage = storage
            self.wants = wants
            self.rows = 0
            self.wanted = 0
            self.files: list[str] = []

        def get_name(self) -> str:
            return "U2SCheckpoint"

        @property
        def min_rows_per_write(self) -> int:
            return self.rows_per_file

        def write(self, blocks, ctx) -> dict[str, Any]:
            tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
            tables = [t.select(WORKING_SCHEMA.names).cast(WORKING_SCHEMA) for t in tables if t.num_rows]
            if not tables:
                return {"rows": 0, "wanted": 0, "file": None}
            table = pa.concat_tables(tables)
            import pyarrow.parquet as pq

            fs, root = arrow_filesystem(self.uri, self.storage)
            name = f"part-{ctx.task_idx:05d}-{uuid.uuid4().hex[:8]}.parquet"
            pq.write_table(table, f"{root.rstrip('/')}/{name}", filesystem=fs, compression="zstd",
                           row_group_size=ROW_GROUP_ROWS)  # fmt: skip
            wanted = select_rows(table, self.wants, keep=True).num_rows
            return {"rows": table.num_rows, "wanted": wanted, "file": uri_join(self.uri, name)}

        def on_write_complete(self, write_result) -> None:
            for returned in write_result.write_returns:
                self.rows += returned["rows"]
                self.wanted += returned["wanted"]
                if returned["file"]:
                    self.files.append(returned["file"])

    return CheckpointDatasink


class WorkDir:
    """The checkpoints of one job, under ``{output.sensitive_uri}/_work/``."""

    def __init__(self, output: OutputConfig, storage: StorageConfig, write_num_cpus: float = 0.25) -> None:
        self.uri = uri_join(output.sensitive_uri, "_work")
        self.rows_per_file = output.rows_per_file
        self.storage = storage
        self.write_num_cpus = write_num_cpus
        self.checkpoints: list[Checkpoint] = []

    def checkpoint(self, ds: ray.data.Dataset, name: str, wants: Wants) -> Checkpoint:
        """Execute ``ds`` into a new checkpoint (this runs the pass); count the rows ``wants`` accepts."""
        uri = uri_join(self.uri, f"{len(self.checkpoints):02d}-{name}")
        fs, path = filesystem(uri, self.storage)
        if fs.exists(path):
            fs.rm(path, recursive=True)  # a leftover of an interrupted run
        fs.makedirs(path, exist_ok=True)
        sink = _checkpoint_sink_cls()(uri, self.storage, wants, self.rows_per_file)
        ds.write_datasink(sink, ray_remote_args={"num_cpus": self.write_num_cpus})
        ckpt = Checkpoint(uri, sink.rows, sink.wanted, tuple(sorted(sink.files)))
        self.checkpoints.append(ckpt)
        logger.info("checkpoint %s: %d rows, %d for %s", name, ckpt.rows, ckpt.wanted, name)
        return ckpt

    def read(
        self, ckpt: Checkpoint, wants: Wants | None = None, keep: bool = True, batch_size: int | None = None
    ) -> ray.data.Dataset:
        """A lazy read of a checkpoint in the working schema: every row, or those where ``wants`` is ``keep``.

        Files are read by light tasks (one per file, row group by row group), not `read_parquet`, whose
        listing task asks for a whole CPU and can wait forever beside engine actors on a small node.
        """
        import ray.data

        if not ckpt.files:
            return ray.data.from_arrow(WORKING_SCHEMA.empty_table())
        items = [{"file": f} for f in ckpt.files]
        return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            read_checkpoint_files, batch_size=1, batch_format="pyarrow", num_cpus=SPLIT_CPUS,
            fn_kwargs={"storage": self.storage, "wants": wants, "keep": keep, "batch_rows": batch_size},
        )  # fmt: skip

    def route(
        self,
        ds: ray.data.Dataset,
        name: str,
        wants: Wants,
        process: Callable[[ray.data.Dataset], ray.data.Dataset],
        batch_size: int | None = None,
    ) -> ray.data.Dataset:
        """Checkpoint ``ds``; return ``process`` over the wanted rows, unioned with the others untouched.

        Every row appears exactly once in the result. ``process`` must keep the working schema.
        """
        ckpt = self.checkpoint(ds, name, wants)
        if ckpt.wanted == 0:
            return self.read(ckpt)
        out = process(self.read(ckpt, wants, True, batch_size))
        if ckpt.wanted < ckpt.rows:
            out = out.union(self.read(ckpt, wants, False))
        return out

    def remove(self) -> None:
        """Delete every checkpoint (they hold private data)."""
        fs, path = filesystem(self.uri, self.storage)
        if fs.exists(path):
            fs.rm(path, recursive=True)

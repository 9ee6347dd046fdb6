"""The shape every pipeline stage shares: a class built once per Ray actor, called per Arrow batch.

A stage declares the columns it reads and writes (``reads`` / ``writes``, as NeMo Curator stages declare
inputs and outputs) and which rows it has work for (:meth:`Stage.wanted`, an Arrow mask). Its
constructor loads its model (heavy imports happen there, never at module import) and
:meth:`Stage.process` fills its columns of the wanted rows, as plain dicts, in place.

``__call__`` adapts that to Ray Data's Arrow batches: rows the stage does not want pass through as
Arrow, never converted to Python; wanted rows materialise only the columns the stage reads, and their
other columns (image bytes included) are carried over as Arrow. It also records per-row seconds in
``timings`` and turns an unexpected failure into per-row errors, so one bad batch never kills the job;
a device or engine failure restarts the actor and isolates the row that caused it (:mod:`u2s.healing`).
"""

from __future__ import annotations

import logging
import time
from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from u2s.healing import BatchGuard, classify
from u2s.schema import WORKING_SCHEMA, mark_error

logger = logging.getLogger(__name__)

#: Columns every stage reads and may write: the row's identity and its lifecycle.
LIFECYCLE = ("id", "status", "error", "timings")


def in_flight(batch: pa.Table) -> pa.ChunkedArray:
    """Rows without a final status yet."""
    return pc.is_null(batch.column("status"))


def flagged(batch: pa.Table) -> pa.ChunkedArray:
    """In-flight rows that stage 1 flagged as private."""
    return pc.and_kleene(in_flight(batch), pc.fill_null(batch.column("privacy_flag"), False))


def has_text(batch: pa.Table, column: str) -> pa.ChunkedArray:
    """Rows whose ``column`` holds a non-empty string."""
    return pc.fill_null(pc.greater(pc.utf8_length(batch.column(column)), 0), False)


def replace_columns(table: pa.Table, values: dict[str, list]) -> pa.Table:
    """``table`` with the named columns replaced by Python values (typed by the working schema)."""
    for name, column in values.items():
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, pa.array(column, type=WORKING_SCHEMA.field(name).type))
    return table


class Stage:
    """Base class of a batch stage. Subclasses set ``name``, ``reads``, ``writes`` and ``process``."""

    name: ClassVar[str]
    #: Columns :meth:`process` reads (besides :data:`LIFECYCLE`); only these become Python objects.
    reads: ClassVar[tuple[str, ...]] = ()
    #: Columns :meth:`process` may set (besides :data:`LIFECYCLE`).
    writes: ClassVar[tuple[str, ...]] = ()

    def wanted(self, batch: pa.Table) -> pa.ChunkedArray:
        """Boolean mask of the rows this stage has work for. Default: rows still in flight."""
        return in_flight(batch)

    def process(self, rows: list[dict]) -> None:
        """Fill this stage's columns of ``rows`` in place (only rows that `wanted` selected)."""
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table:
        mask = pc.fill_null(self.wanted(batch), False)
        if not pc.any(mask).as_py():
            return batch
        todo = batch.filter(mask)
        columns = list(dict.fromkeys((*LIFECYCLE, *self.reads, *self.writes)))
        rows = todo.select(columns).to_pylist()
        start = time.perf_counter()
        guard = BatchGuard(self.name, [row["id"] for row in rows])
        if guard.suspect:  # an actor died while this batch was in flight: isolate the row that kills it
            for row in rows:
                self._run([row], guard)
        else:
            self._run(rows, guard)
        guard.done()
        seconds = (time.perf_counter() - start) / len(rows)
        for row in rows:  # a stage that runs again on a row (a re-edit under stage2.verify) adds its time
            timings = row["timings"] or {}
            row["timings"] = {**timings, self.name: (timings.get(self.name) or 0.0) + seconds}
        written = dict.fromkeys(("status", "error", "timings", *self.writes))
        done = replace_columns(todo, {name: [row[name] for row in rows] for name in written})
        return pa.concat_tables([done, batch.filter(pc.invert(mask))])

    def _run(self, rows: list[dict], guard: BatchGuard) -> None:
        """:meth:`process` on ``rows`` (a whole batch, or one row of a suspect batch); an error fails them.

        A fatal device or engine error exits the actor first (:meth:`BatchGuard.died`), in a Ray actor."""
        if guard.suspect:
            (row,) = rows
            if row["status"] is not None:
                return
            reason = guard.poison(row["id"])
            if reason is not None:
                mark_error(row, self.name, reason)
                return
            guard.running(row["id"])
        try:
            self.process(rows)
        except Exception as e:  # a bug or a device failure: fail these rows, keep the job
            # Only the exception type reaches the row and the log: messages may quote private text.
            logger.error("stage %s failed on %d rows: %s", self.name, len(rows), type(e).__name__)
            if classify(e) == "fatal":
                guard.died(e)
            for row in rows:
                if row["status"] is None:
                    mark_error(row, self.name, f"unexpected {type(e).__name__}")


class StageChain:
    """Several stages run one after another on each batch in one actor (e.g. one VLM for calls A and B).

    Built from ``stages``, a list of already-constructed stages (they may share a model).
    """

    def __init__(self, stages: list[Stage]) -> None:
        self.stages = stages

    def __call__(self, batch: pa.Table) -> pa.Table:
        for stage in self.stages:
            batch = stage(batch)
        return batch

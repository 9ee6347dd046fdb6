"""The shape every pipeline stage shares: a class built once per Ray actor, called per batch.

A stage's constructor loads its model (heavy imports happen there, never at module import), and
:meth:`Stage.process` works on plain row dicts of the working schema, in place. ``__call__`` adapts
that to Ray Data's Arrow batches, records per-row seconds in ``timings``, and turns an unexpected
failure into per-row errors so one bad batch never kills the job.
"""

from __future__ import annotations

import logging
import time
from typing import ClassVar

import pyarrow as pa

from u2s.schema import mark_error, rows_to_table

logger = logging.getLogger(__name__)


class Stage:
    """Base class of a batch stage. Subclasses set ``name`` and implement ``process``."""

    name: ClassVar[str]

    def wants(self, row: dict) -> bool:
        """Whether this stage has work for ``row``. Default: rows still in flight."""
        return row["status"] is None

    def process(self, rows: list[dict]) -> None:
        """Fill this stage's columns of ``rows`` in place (only rows that `wants` accepted)."""
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = [row for row in rows if self.wants(row)]
        if todo:
            start = time.perf_counter()
            try:
                self.process(todo)
            except Exception as e:  # a bug or a device failure: fail these rows, keep the job
                # Only the exception type reaches the row and the log: messages may quote private text.
                logger.error("stage %s failed on %d rows: %s", self.name, len(todo), type(e).__name__)
                for row in todo:
                    if row["status"] is None:
                        mark_error(row, self.name, f"unexpected {type(e).__name__}")
            seconds = (time.perf_counter() - start) / len(todo)
            for row in todo:
                row["timings"] = {**(row["timings"] or {}), self.name: seconds}
        return rows_to_table(rows)

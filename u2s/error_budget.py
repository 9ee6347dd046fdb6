"""``run.max_error_fraction``: stop a run early when most of the rows it writes are error rows.

A misconfigured run (a wrong model id, an editor that cannot load, an unreadable input) turns every row
into an error row; without a check it would spend the whole cluster time writing them. Write tasks report
each block of rows before they write it (counts by error reason: reasons are content-free) to one small
Ray actor; once at least ``run.min_rows_for_error_fraction`` rows are in and more than
``run.max_error_fraction`` of them are errors, the actor says stop, the write task raises
:class:`ErrorBudgetExceeded`, and the driver ends the run with a message naming the top reasons. Files
committed before the stop stay; ``--resume`` continues. The same tally counts rows by status and busy
seconds per stage, which u2s's progress line reads (:mod:`u2s.progress`).
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from u2s.config import OutputConfig, RunConfig, StorageConfig
from u2s.progress import Progress

if TYPE_CHECKING:
    import pyarrow as pa

#: Reasons the stop message names.
TOP_REASONS = 3


class ErrorBudgetExceeded(RuntimeError):
    """A write task's signal that the run's error budget is spent (the message holds counts only)."""


@dataclass
class ErrorCounts:
    """Rows written so far by this attempt, and its error rows by reason."""

    rows: int = 0
    errors: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    stopped: bool = False

    def top(self, n: int = TOP_REASONS) -> list[tuple[str, int]]:
        return Counter(self.reasons).most_common(n)


class _Counter:
    """The run's tally (a Ray actor: one per run, reached by every write task)."""

    def __init__(self, max_error_fraction: float | None, min_rows: int) -> None:
        self.limit, self.min_rows = max_error_fraction, min_rows
        self.counts = ErrorCounts()
        self.progress = Progress()

    def add(self, rows: int, reasons: dict[str, int], by_status: dict[str, int] | None = None,
            stage_seconds: dict[str, float] | None = None) -> bool:  # fmt: skip
        """Count a written block; returns whether the run must stop."""
        counts = self.counts
        counts.rows += rows
        for reason, n in reasons.items():
            counts.reasons[reason] = counts.reasons.get(reason, 0) + n
            counts.errors += n
        progress = self.progress
        progress.rows += rows
        for status, n in (by_status or {}).items():
            progress.by_status[status] = progress.by_status.get(status, 0) + n
        for stage, seconds in (stage_seconds or {}).items():
            progress.stage_seconds[stage] = progress.stage_seconds.get(stage, 0.0) + seconds
        limit = self.limit
        if limit is not None and counts.rows >= self.min_rows and counts.errors > limit * counts.rows:
            counts.stopped = True
        return counts.stopped

    def state(self) -> ErrorCounts:
        return self.counts

    def progress_state(self) -> Progress:
        return self.progress


class ErrorBudget:
    """A handle on a run's error tally, for the driver and the write tasks (it travels with the sink)."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    @classmethod
    def start(cls, run: RunConfig) -> ErrorBudget:
        """A fresh tally for one attempt (``run.max_error_fraction`` None: it counts, and never stops)."""
        import ray

        actor_class = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(_Counter)
        actor = actor_class.options(name=f"u2s-error-budget-{uuid.uuid4().hex[:12]}").remote(
            run.max_error_fraction, run.min_rows_for_error_fraction
        )
        return cls(actor)

    def report(self, table: pa.Table) -> None:
        """Count a block of finished rows (a write task calls this); raise :class:`ErrorBudgetExceeded` once
        the run must stop."""
        import pyarrow.compute as pc
        import ray

        from u2s.schema import STAGES

        def counts(column: pa.ChunkedArray) -> dict[str, int]:
            column = column.drop_null()
            return (
                {v["values"]: v["counts"] for v in pc.value_counts(column).to_pylist()} if len(column) else {}
            )

        timings = table.column("timings")
        stage_seconds = {stage: pc.sum(pc.struct_field(timings, stage)).as_py() or 0.0 for stage in STAGES}
        busy = {stage: seconds for stage, seconds in stage_seconds.items() if seconds}
        added = self.actor.add.remote(
            table.num_rows, counts(table.column("error")), counts(table.column("status")), busy
        )
        if ray.get(added):
            raise ErrorBudgetExceeded("the share of error rows passed run.max_error_fraction")

    def state(self) -> ErrorCounts:
        """The tally so far (an empty one if the actor is gone: the run's own error is reported then)."""
        import ray

        try:
            return ray.get(self.actor.state.remote(), timeout=60)
        except (ray.exceptions.RayError, TimeoutError):
            return ErrorCounts()

    def progress(self) -> Progress:
        """Rows counted so far by status, and busy seconds per stage (the progress line's numbers)."""
        import ray

        return ray.get(self.actor.progress_state.remote(), timeout=10)

    def close(self) -> None:
        import ray

        ray.kill(self.actor, no_restart=True)


def committed_rows(output: OutputConfig, storage: StorageConfig) -> int:
    """Rows committed in the outputs (the safe table is the commit record)."""
    from u2s.io.writers import read_columns

    return read_columns(output.uri, storage, ["id"]).num_rows


def stop_message(counts: ErrorCounts, run: RunConfig, written: int) -> str:
    """Why the run stopped, what it left and how to continue (reasons are content-free by contract)."""
    top = "; ".join(f"{reason!r} x{n}" for reason, n in counts.top())
    return (
        f"the run stopped early: {counts.errors} of the first {counts.rows} rows were errors, more than "
        f"run.max_error_fraction={run.max_error_fraction}. Top reasons: {top}. {written} row(s) are written "
        "in the outputs; fix the config (model ids, editor, input), then rerun the same command with "
        "--resume (add --retry-errors to process the error rows again), or raise run.max_error_fraction"
    )

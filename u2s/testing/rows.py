"""Working rows for tests and benchmarks: rows as decode leaves them, and stages run in row order."""

from __future__ import annotations

from typing import TYPE_CHECKING

from u2s.config import DecodeConfig
from u2s.io.decode_stage import DecodeStage
from u2s.schema import WORKING_SCHEMA, new_row, rows_to_table

if TYPE_CHECKING:
    from collections.abc import Callable

    import pyarrow as pa


def decoded_rows(
    images: list[bytes],
    labels: list[str | None] | None = None,
    thumbnail_side: int = 448,
    prefix: str = "img",
) -> list[dict]:
    """One working row per encoded image, through the real decode stage (size, thumbnail); ids
    ``{prefix}-{i}``. Bytes that do not decode give decode error rows, as in a run."""
    labels = labels or [None] * len(images)
    rows = [new_row(f"{prefix}-{i}", f"mem://{prefix}-{i}", labels[i], data) for i, data in enumerate(images)]
    stage = DecodeStage(DecodeConfig(), thumbnail_side=thumbnail_side, metadata="keep")
    return run_stage(stage, rows)


def run_stage(stage: Callable[[pa.Table], pa.Table], rows: list[dict]) -> list[dict]:
    """``stage`` over ``rows`` as one Arrow batch; the output rows in input order (stages move the rows
    they process ahead of the ones they pass through)."""
    table = stage(rows_to_table(rows))
    assert table.schema == WORKING_SCHEMA
    order = {row["id"]: i for i, row in enumerate(rows)}
    return sorted(table.to_pylist(), key=lambda row: order[row["id"]])

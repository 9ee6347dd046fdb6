"""Stage 1, calls A + B fused: one VLM call per row returns the flag and, on flagged rows, the
categories, the privacy review and both captions (``stage1.mode: fused``).

The decoder schema (:class:`~u2s.stage1.schemas.FusedResult`) lets an unflagged answer stop after
``{"privacy_flag":false}``, so unflagged images cost about what call A alone costs, and flagged images
skip the second image encoding and prompt of a separate describe call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from u2s.schema import Status
from u2s.stage1.call import ModelCallStage
from u2s.stage1.calls import CALLS
from u2s.stage1.prompts import fused_messages
from u2s.stage1.rows import inspect_frames
from u2s.stage1.schemas import FusedFlagged, FusedResult

if TYPE_CHECKING:
    from u2s.config import Stage1Config


class FusedInspectStage(ModelCallStage, call="inspect"):
    """Sets ``privacy_flag`` and ``categories`` on every row; on flagged rows also ``review``,
    ``private_caption`` and ``public_caption``. Unflagged rows end here with status ``kept`` and null
    captions. Runs as the inspect call (``stage1.calls.inspect``'s engine and pool) with
    ``stage1.calls.describe``'s token budget; timings and errors are recorded under ``inspect``.
    """

    result_model = FusedResult
    reads = ("thumbnail", "frame_thumbnails", "label")
    writes = (*CALLS["describe"].writes, "privacy_flag", "categories", "flagged_frame")

    @staticmethod
    def messages(stage1: Stage1Config, row: dict) -> list[dict]:
        return fused_messages(row["label"] or stage1.default_class_hint)

    def process(self, rows: list[dict]) -> None:
        if any(row.get("frame_thumbnails") for row in rows):  # decode.frames: all, multi-frame rows
            inspect_frames(rows, self.process, self.writes)
            return
        super().process(rows)

    @staticmethod
    def apply(row: dict, result: FusedResult) -> None:
        record = result.root
        if not isinstance(record, FusedFlagged):
            row.update(privacy_flag=False, categories=[], status=Status.KEPT.value)
            return
        row["privacy_flag"] = True
        row["categories"] = [c.value for c in record.categories]
        CALLS["describe"].apply(row, record)

"""Stage 1, call D (optional, ``stage1.combine``): the text LLM merges the public caption and the edit
instruction into one caption of the edited image, ``combined_caption`` (FlowEdit's target prompt and
that of other single-prompt editors)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow.compute as pc

from u2s.stage import flagged, has_text
from u2s.stage1.call import ModelCallStage
from u2s.stage1.prompts import combine_messages
from u2s.stage1.schemas import CombineResult

if TYPE_CHECKING:
    import pyarrow as pa

    from u2s.config import Stage1Config


class CombineStage(ModelCallStage):
    """Sets ``combined_caption`` on flagged in-flight rows that have a public caption and an instruction."""

    name = "combine"
    vision = False
    result_model = CombineResult
    reads = ("label", "public_caption", "edit_instruction")
    writes = ("combined_caption",)

    def wanted(self, batch: pa.Table) -> pa.ChunkedArray:
        wanted = pc.and_(flagged(batch), has_text(batch, "public_caption"))
        return pc.and_(wanted, has_text(batch, "edit_instruction"))

    @staticmethod
    def messages(stage1: Stage1Config, row: dict) -> list[dict]:
        hint = row["label"] or stage1.default_class_hint
        return combine_messages(row["public_caption"], row["edit_instruction"], hint)

    @staticmethod
    def apply(row: dict, result: CombineResult) -> None:
        row["combined_caption"] = result.combined_caption

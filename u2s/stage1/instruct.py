"""Stage 1, call C: a text LLM turns the public caption into an identity-neutral edit instruction."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow.compute as pc

from u2s.stage import flagged, has_text
from u2s.stage1.call import ModelCallStage
from u2s.stage1.prompts import instruct_messages
from u2s.stage1.schemas import InstructResult

if TYPE_CHECKING:
    import pyarrow as pa

    from u2s.config import Stage1Config


class InstructStage(ModelCallStage):
    """Sets ``edit_instruction`` on flagged in-flight rows that have a public caption."""

    name = "instruct"
    vision = False
    result_model = InstructResult
    reads = ("public_caption",)
    writes = ("edit_instruction",)

    def wanted(self, batch: pa.Table) -> pa.ChunkedArray:
        return pc.and_(flagged(batch), has_text(batch, "public_caption"))

    @staticmethod
    def messages(stage1: Stage1Config, row: dict) -> list[dict]:
        return instruct_messages(row["public_caption"])

    @staticmethod
    def apply(row: dict, result: InstructResult) -> None:
        row["edit_instruction"] = result.edit_instruction

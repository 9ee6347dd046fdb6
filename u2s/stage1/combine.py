"""Stage 1, call D (optional, ``stage1.combine``): the text LLM merges the public caption and the edit
instruction into one caption of the edited image, ``combined_caption`` (FlowEdit's target prompt and
that of other single-prompt editors)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from u2s.stage1.call import ModelCallStage
from u2s.stage1.prompts import combine_messages
from u2s.stage1.schemas import CombineResult

if TYPE_CHECKING:
    from u2s.config import GenerationConfig, Resources, Stage1Config


class CombineStage(ModelCallStage):
    """Sets ``combined_caption`` on flagged in-flight rows that have a public caption and an instruction."""

    name = "combine"
    vision = False
    result_model = CombineResult

    @staticmethod
    def resources(stage1: Stage1Config) -> Resources:
        return stage1.combine_resources

    @staticmethod
    def generation(stage1: Stage1Config) -> GenerationConfig:
        return stage1.combine_generation

    @staticmethod
    def messages(stage1: Stage1Config, row: dict) -> list[dict]:
        hint = row["label"] or stage1.default_class_hint
        return combine_messages(row["public_caption"], row["edit_instruction"], hint)

    @staticmethod
    def apply(row: dict, result: CombineResult) -> None:
        row["combined_caption"] = result.combined_caption

    def wants(self, row: dict) -> bool:
        return (
            row["status"] is None
            and row["privacy_flag"] is True
            and bool(row["public_caption"])
            and bool(row["edit_instruction"])
        )

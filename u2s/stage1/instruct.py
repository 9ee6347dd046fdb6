"""Stage 1, call C: a text LLM turns the public caption into an identity-neutral edit instruction."""

from __future__ import annotations

from typing import TYPE_CHECKING

from u2s.stage1.call import ModelCallStage
from u2s.stage1.prompts import instruct_messages
from u2s.stage1.schemas import InstructResult

if TYPE_CHECKING:
    from u2s.config import GenerationConfig, Resources, Stage1Config


class InstructStage(ModelCallStage):
    """Sets ``edit_instruction`` on flagged in-flight rows that have a public caption."""

    name = "instruct"
    vision = False
    result_model = InstructResult

    @staticmethod
    def resources(stage1: Stage1Config) -> Resources:
        return stage1.instruct

    @staticmethod
    def generation(stage1: Stage1Config) -> GenerationConfig:
        return stage1.instruct_generation

    @staticmethod
    def messages(stage1: Stage1Config, row: dict) -> list[dict]:
        return instruct_messages(row["public_caption"])

    @staticmethod
    def apply(row: dict, result: InstructResult) -> None:
        row["edit_instruction"] = result.edit_instruction

    def wants(self, row: dict) -> bool:
        return row["status"] is None and row["privacy_flag"] is True and bool(row["public_caption"])

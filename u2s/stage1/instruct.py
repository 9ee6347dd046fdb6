"""Stage 1, call C: a text LLM turns the public caption into an identity-neutral edit instruction."""

from __future__ import annotations

from typing import TYPE_CHECKING

from u2s.schema import mark_error
from u2s.stage import Stage
from u2s.stage1.engines import Engine, build_engine, generate_validated
from u2s.stage1.prompts import apply_system_prompt, instruct_messages
from u2s.stage1.rows import batch_seed
from u2s.stage1.schemas import InstructResult, OutputError

if TYPE_CHECKING:
    from u2s.config import Stage1Config


class InstructStage(Stage):
    """Sets ``edit_instruction`` on flagged in-flight rows that have a public caption."""

    name = "instruct"

    def __init__(self, stage1: Stage1Config, engine: Engine | None = None) -> None:
        from u2s.torch_utils import set_threads

        set_threads(stage1.instruct.threads())
        self.config = stage1
        self.engine = engine or build_engine(stage1, stage1.llm, vision=False)

    def wants(self, row: dict) -> bool:
        return row["status"] is None and row["privacy_flag"] is True and bool(row["public_caption"])

    def process(self, rows: list[dict]) -> None:
        conversations = apply_system_prompt(
            [instruct_messages(row["public_caption"]) for row in rows], self.config.system_prompt
        )
        results = generate_validated(
            self.engine, conversations, None, InstructResult, self.config.instruct_generation,
            seed=batch_seed(rows),
        )  # fmt: skip
        for row, result in zip(rows, results, strict=True):
            if isinstance(result, OutputError):
                mark_error(row, self.name, str(result))
            else:
                row["edit_instruction"] = result.edit_instruction

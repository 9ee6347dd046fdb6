"""Stage 1, call D (optional, ``stage1.combine``): the text LLM merges the public caption and the edit
instruction into one caption of the edited image, ``combined_caption`` (FlowEdit's target prompt and
that of other single-prompt editors)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from u2s.schema import mark_error
from u2s.stage import Stage
from u2s.stage1.engines import Engine, build_engine, generate_validated
from u2s.stage1.prompts import apply_system_prompt, combine_messages
from u2s.stage1.rows import batch_seed
from u2s.stage1.schemas import CombineResult, OutputError

if TYPE_CHECKING:
    from u2s.config import Stage1Config


class CombineStage(Stage):
    """Sets ``combined_caption`` on flagged in-flight rows that have a public caption and an instruction."""

    name = "combine"

    def __init__(self, stage1: Stage1Config, engine: Engine | None = None) -> None:
        from u2s.torch_utils import set_threads

        set_threads(stage1.combine_resources.threads())
        self.config = stage1
        self.engine = engine or build_engine(stage1, stage1.llm, vision=False)

    def wants(self, row: dict) -> bool:
        return (
            row["status"] is None
            and row["privacy_flag"] is True
            and bool(row["public_caption"])
            and bool(row["edit_instruction"])
        )

    def process(self, rows: list[dict]) -> None:
        conversations = apply_system_prompt(
            [
                combine_messages(row["public_caption"], row["edit_instruction"],
                                 row["label"] or self.config.default_class_hint)
                for row in rows
            ],
            self.config.system_prompt,
        )  # fmt: skip
        results = generate_validated(
            self.engine, conversations, None, CombineResult, self.config.combine_generation,
            seed=batch_seed(rows),
        )  # fmt: skip
        for row, result in zip(rows, results, strict=True):
            if isinstance(result, OutputError):
                mark_error(row, self.name, str(result))
            else:
                row["combined_caption"] = result.combined_caption

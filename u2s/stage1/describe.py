"""Stage 1, call B: on flagged rows the VLM writes a privacy review, a private and a public caption."""

from __future__ import annotations

from typing import TYPE_CHECKING

from u2s.schema import mark_error
from u2s.stage import Stage
from u2s.stage1.engines import Engine, build_engine, generate_validated
from u2s.stage1.prompts import apply_system_prompt, describe_messages
from u2s.stage1.rows import batch_seed, load_images
from u2s.stage1.schemas import DescribeResult, OutputError

if TYPE_CHECKING:
    from u2s.config import Stage1Config


class DescribeStage(Stage):
    """Sets ``review`` (list of {item, reason, category}), ``private_caption`` and ``public_caption``."""

    name = "describe"

    def __init__(self, stage1: Stage1Config, engine: Engine | None = None) -> None:
        from u2s.torch_utils import set_threads

        set_threads(stage1.describe.threads())
        self.config = stage1
        self.engine = engine or build_engine(stage1, stage1.vlm, vision=True)

    def wants(self, row: dict) -> bool:
        return row["status"] is None and row["privacy_flag"] is True

    def process(self, rows: list[dict]) -> None:
        ready, images = load_images(rows, self.name)
        if not ready:
            return
        conversations = apply_system_prompt(
            [describe_messages(row["label"] or self.config.default_class_hint) for row in ready],
            self.config.system_prompt,
        )
        results = generate_validated(
            self.engine, conversations, images, DescribeResult, self.config.describe_generation,
            seed=batch_seed(ready),
        )  # fmt: skip
        for row, result in zip(ready, results, strict=True):
            if isinstance(result, OutputError):
                mark_error(row, self.name, str(result))
                continue
            row["review"] = [item.model_dump(mode="json") for item in result.review]
            row["private_caption"] = result.private_caption
            row["public_caption"] = result.public_caption

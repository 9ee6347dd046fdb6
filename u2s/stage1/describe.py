"""Stage 1, call B: on flagged rows the VLM writes a privacy review, a private and a public caption."""

from __future__ import annotations

from typing import TYPE_CHECKING

from u2s.stage1.call import ModelCallStage
from u2s.stage1.prompts import describe_messages
from u2s.stage1.schemas import DescribeResult, FusedFlagged

if TYPE_CHECKING:
    from u2s.config import GenerationConfig, Resources, Stage1Config


class DescribeStage(ModelCallStage):
    """Sets ``review`` (list of {item, reason, category}), ``private_caption`` and ``public_caption``."""

    name = "describe"
    vision = True
    result_model = DescribeResult

    @staticmethod
    def resources(stage1: Stage1Config) -> Resources:
        return stage1.describe

    @staticmethod
    def generation(stage1: Stage1Config) -> GenerationConfig:
        return stage1.describe_generation

    @staticmethod
    def messages(stage1: Stage1Config, row: dict) -> list[dict]:
        return describe_messages(row["label"] or stage1.default_class_hint)

    @staticmethod
    def apply(row: dict, result: DescribeResult | FusedFlagged) -> None:
        row["review"] = [item.model_dump(mode="json") for item in result.review]
        row["private_caption"] = result.private_caption
        row["public_caption"] = result.public_caption

    def wants(self, row: dict) -> bool:
        return row["status"] is None and row["privacy_flag"] is True

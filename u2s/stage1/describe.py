"""Stage 1, call B: on flagged rows the VLM writes a privacy review, a private and a public caption."""

from __future__ import annotations

from typing import TYPE_CHECKING

from u2s.stage import flagged
from u2s.stage1.call import ModelCallStage
from u2s.stage1.prompts import describe_messages
from u2s.stage1.schemas import DescribeResult, FusedFlagged

if TYPE_CHECKING:
    import pyarrow as pa

    from u2s.config import Stage1Config


class DescribeStage(ModelCallStage):
    """Sets ``review`` (list of {item, reason, category}), ``private_caption`` and ``public_caption``."""

    name = "describe"
    vision = True
    result_model = DescribeResult
    reads = ("thumbnail", "label")
    writes = ("review", "private_caption", "public_caption")

    def wanted(self, batch: pa.Table) -> pa.ChunkedArray:
        return flagged(batch)

    @staticmethod
    def messages(stage1: Stage1Config, row: dict) -> list[dict]:
        return describe_messages(row["label"] or stage1.default_class_hint)

    @staticmethod
    def apply(row: dict, result: DescribeResult | FusedFlagged) -> None:
        row["review"] = [item.model_dump(mode="json") for item in result.review]
        row["private_caption"] = result.private_caption
        row["public_caption"] = result.public_caption

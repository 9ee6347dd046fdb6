"""Stage 1, calls A + B fused: one VLM call per row returns the flag and, on flagged rows, the
categories, the privacy review and both captions (``stage1.mode: fused``).

The decoder schema (:class:`~u2s.stage1.schemas.FusedResult`) lets an unflagged answer stop after
``{"privacy_flag":false}``, so unflagged images cost about what call A alone costs, and flagged images
skip the second image encoding and prompt of a separate describe call.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from u2s.schema import Status, mark_error
from u2s.stage import Stage
from u2s.stage1.engines import Engine, build_engine, generate_validated
from u2s.stage1.prompts import apply_system_prompt, fused_messages
from u2s.stage1.rows import batch_seed, load_images
from u2s.stage1.schemas import FusedFlagged, FusedResult, OutputError

if TYPE_CHECKING:
    from u2s.config import Stage1Config

logger = logging.getLogger(__name__)


class FusedInspectStage(Stage):
    """Sets ``privacy_flag`` and ``categories`` on every row; on flagged rows also ``review``,
    ``private_caption`` and ``public_caption``. Unflagged rows end here with status ``kept`` and null
    captions. Runs in the inspect pool (``stage1.inspect``) with ``describe_generation``'s budget;
    timings and errors are recorded under ``inspect``.
    """

    name = "inspect"

    def __init__(self, stage1: Stage1Config, engine: Engine | None = None) -> None:
        from u2s.torch_utils import set_threads

        set_threads(stage1.inspect.threads())
        self.config = stage1
        self.engine = engine or build_engine(stage1, stage1.vlm, vision=True)

    def process(self, rows: list[dict]) -> None:
        ready, images = load_images(rows, self.name)
        if not ready:
            return
        conversations = apply_system_prompt(
            [fused_messages(row["label"] or self.config.default_class_hint) for row in ready],
            self.config.system_prompt,
        )
        results = generate_validated(
            self.engine, conversations, images, FusedResult, self.config.describe_generation,
            seed=batch_seed(ready),
        )  # fmt: skip
        for row, result in zip(ready, results, strict=True):
            if isinstance(result, OutputError):
                mark_error(row, self.name, str(result))
                continue
            record = result.root
            if not isinstance(record, FusedFlagged):
                row.update(privacy_flag=False, categories=[], status=Status.KEPT.value)
                continue
            row["privacy_flag"] = True
            row["categories"] = [c.value for c in record.categories]
            row["review"] = [item.model_dump(mode="json") for item in record.review]
            row["private_caption"] = record.private_caption
            row["public_caption"] = record.public_caption
        flagged = sum(1 for row in ready if row["privacy_flag"])
        logger.debug("fused inspect: %d rows, %d flagged", len(rows), flagged)

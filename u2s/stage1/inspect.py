"""Stage 1, call A: the VLM flags privacy-prone images and names the categories present (every row)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from u2s.schema import Status, mark_error
from u2s.stage import Stage
from u2s.stage1.engines import Engine, build_engine, generate_validated
from u2s.stage1.prompts import inspect_messages
from u2s.stage1.rows import batch_seed, load_images
from u2s.stage1.schemas import InspectResult, OutputError

if TYPE_CHECKING:
    from u2s.config import Stage1Config

logger = logging.getLogger(__name__)


class InspectStage(Stage):
    """Sets ``privacy_flag`` and ``categories``; unflagged rows end here with status ``kept``.

    A row counts as flagged when the model says TRUE *or* lists any category: over-flagging is the
    paper's choice for recall (when unsure → TRUE), and a named category is evidence of private content.
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
        results = generate_validated(
            self.engine, [inspect_messages() for _ in ready], images, InspectResult,
            self.config.inspect_generation, seed=batch_seed(ready),
        )  # fmt: skip
        for row, result in zip(ready, results, strict=True):
            if isinstance(result, OutputError):
                mark_error(row, self.name, str(result))
                continue
            row["categories"] = [c.value for c in result.categories]
            row["privacy_flag"] = result.privacy_flag or bool(row["categories"])
            if not row["privacy_flag"]:
                row["status"] = Status.KEPT.value
        flagged = sum(1 for row in ready if row["privacy_flag"])
        logger.debug("inspect: %d rows, %d flagged", len(rows), flagged)

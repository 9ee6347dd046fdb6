"""Stage 1, call A: the VLM flags privacy-prone images and names the categories present (every row).

``inspect_mode`` "single" asks one question per image (the paper's call A); "per_criterion" asks nine,
one per privacy category (the paper's per-category prompt variant), all rows' questions in one engine
call, for analysis runs.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from u2s.schema import Category, Status, mark_error
from u2s.stage import Stage
from u2s.stage1.engines import Engine, build_engine, generate_validated
from u2s.stage1.prompts import apply_system_prompt, criterion_messages, inspect_messages
from u2s.stage1.rows import batch_seed, load_images
from u2s.stage1.schemas import CriterionResult, InspectResult, OutputError

if TYPE_CHECKING:
    from PIL import Image

    from u2s.config import Stage1Config

logger = logging.getLogger(__name__)

CATEGORIES = tuple(Category)


class InspectStage(Stage):
    """Sets ``privacy_flag`` and ``categories``; unflagged rows end here with status ``kept``.

    Single mode: a row counts as flagged when the model says TRUE *or* lists any category: over-flagging
    is the paper's choice for recall (when unsure → TRUE), and a named category is evidence of private
    content. Per-criterion mode: categories = those answered TRUE, flag = any TRUE; a row with any
    invalid answer (after the retry) is failed.
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
        if self.config.inspect_mode == "per_criterion":
            self._per_criterion(ready, images)
        else:
            self._single(ready, images)
        for row in ready:
            if row["status"] is None and not row["privacy_flag"]:
                row["status"] = Status.KEPT.value
        flagged = sum(1 for row in ready if row["privacy_flag"])
        logger.debug("inspect: %d rows, %d flagged", len(rows), flagged)

    def _single(self, rows: list[dict], images: list[Image.Image]) -> None:
        conversations = apply_system_prompt([inspect_messages() for _ in rows], self.config.system_prompt)
        results = generate_validated(
            self.engine, conversations, images, InspectResult, self.config.inspect_generation,
            seed=batch_seed(rows),
        )  # fmt: skip
        for row, result in zip(rows, results, strict=True):
            if isinstance(result, OutputError):
                mark_error(row, self.name, str(result))
                continue
            row["categories"] = [c.value for c in result.categories]
            row["privacy_flag"] = result.privacy_flag or bool(row["categories"])

    def _per_criterion(self, rows: list[dict], images: list[Image.Image]) -> None:
        # Row-major: row i's nine questions are conversations 9i .. 9i+8, in category order.
        questions = [criterion_messages(category) for category in CATEGORIES]
        conversations = apply_system_prompt(questions * len(rows), self.config.system_prompt)
        repeated = [image for image in images for _ in CATEGORIES]
        results = generate_validated(
            self.engine, conversations, repeated, CriterionResult, self.config.inspect_generation,
            seed=batch_seed(rows),
        )  # fmt: skip
        n = len(CATEGORIES)
        for index, row in enumerate(rows):
            answers = results[index * n : (index + 1) * n]
            failed = [(c, a) for c, a in zip(CATEGORIES, answers, strict=True) if isinstance(a, OutputError)]
            if failed:
                category, error = failed[0]
                mark_error(row, self.name, f"{category.value}: {error}")
                continue
            row["categories"] = [c.value for c, a in zip(CATEGORIES, answers, strict=True) if a.present]
            row["privacy_flag"] = bool(row["categories"])

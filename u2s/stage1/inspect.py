"""Stage 1, call A: the VLM flags privacy-prone images and names the categories present (every row).

``inspect_mode`` "single" asks one question per image (the paper's call A); "per_criterion" asks nine,
one per privacy category (the paper's per-category prompt variant), all rows' questions in one engine
call, for analysis runs.
"""

from __future__ import annotations

from u2s.schema import Category, mark_error
from u2s.stage1.call import ModelCallStage
from u2s.stage1.calls import flag_row
from u2s.stage1.prompts import apply_system_prompt, criterion_messages
from u2s.stage1.rows import inspect_frames
from u2s.stage1.schemas import CriterionResult, OutputError

CATEGORIES = tuple(Category)


class InspectStage(ModelCallStage, call="inspect"):
    """Sets ``privacy_flag`` and ``categories``; unflagged rows end here with status ``kept``.

    Single mode: a row counts as flagged when the model says TRUE *or* lists any category: over-flagging
    is the paper's choice for recall (when unsure → TRUE), and a named category is evidence of private
    content. Per-criterion mode: categories = those answered TRUE, flag = any TRUE; a row with any
    invalid answer (after the retry) is failed. With ``decode.frames: all`` each frame of a multi-frame
    row is asked separately (:func:`~u2s.stage1.rows.inspect_frames`).
    """

    def process(self, rows: list[dict]) -> None:
        if any(row.get("frame_thumbnails") for row in rows):  # decode.frames: all, multi-frame rows
            inspect_frames(rows, self.process, self.writes)
            return
        if self.config.inspect_mode != "per_criterion":
            super().process(rows)
            return
        ready, images = self.load(rows)
        if not ready:
            return
        # Row-major: row i's nine questions are conversations 9i .. 9i+8, in category order.
        questions = [criterion_messages(category) for category in CATEGORIES]
        conversations = apply_system_prompt(questions * len(ready), self.config.system_prompt)
        repeated = [image for image in images for _ in CATEGORIES]
        results = self.generate(ready, conversations, repeated, CriterionResult)
        n = len(CATEGORIES)
        for index, row in enumerate(ready):
            answers = results[index * n : (index + 1) * n]
            failed = [(c, a) for c, a in zip(CATEGORIES, answers, strict=True) if isinstance(a, OutputError)]
            if failed:
                category, error = failed[0]
                mark_error(row, self.name, f"{category.value}: {error}")
                continue
            flag_row(row, [c.value for c, a in zip(CATEGORIES, answers, strict=True) if a.present])

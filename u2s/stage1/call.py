"""The template every stage-1 model call follows, whichever engine runs it.

A call declares, per subclass of :class:`ModelCallStage`, which rows it wants (an Arrow mask), the
columns it reads and writes, whether it sees the image (``vision``), its result model, how a row
becomes a conversation (:meth:`~ModelCallStage.messages`) and how a validated result lands in the row
(:meth:`~ModelCallStage.apply`). Its engine, token budget and pool come from ``stage1.calls.<name>``.
The base class owns the rest: thumbnails in, system-prompt policy, validated generation with one
sampled retry, per-row errors.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

from u2s.schema import Status, mark_error
from u2s.stage import Stage
from u2s.stage1.engines import Engine, build_engine, generate_validated
from u2s.stage1.prompts import apply_system_prompt
from u2s.stage1.rows import load_thumbnails, sampling_seeds
from u2s.stage1.schemas import OutputError

if TYPE_CHECKING:
    from PIL import Image
    from pydantic import BaseModel

    from u2s.config import GenerationConfig, ModelConfig, Stage1Config

logger = logging.getLogger(__name__)


class ModelCallStage(Stage):
    """One stage-1 model call: one conversation per wanted row, one validated result per conversation.

    Subclasses set ``name``, ``vision``, ``result_model``, ``reads``/``writes`` and implement
    :meth:`messages` and :meth:`apply` (and :meth:`wanted` when they want fewer rows than all in-flight
    ones). ``engine``: a loaded engine to share (the calls of one pool share their model); default: load
    the engine ``stage1.calls.<name>`` names.
    """

    #: Whether the call sends the row's image (the VLM) or text only (the LLM).
    vision: ClassVar[bool]
    #: The pydantic model an answer must validate against (its JSON schema constrains decoding).
    result_model: ClassVar[type[BaseModel]]

    def __init__(self, stage1: Stage1Config, engine: Engine | None = None) -> None:
        self.config = stage1
        self.engine = engine or build_engine(
            stage1, stage1.engine_for(self.name), self.model(stage1), vision=self.vision
        )

    # -- what each call declares ---------------------------------------------------------------------

    @staticmethod
    def messages(stage1: Stage1Config, row: dict) -> list[dict]:
        """The chat messages asking this call's question about ``row`` (before the system-prompt policy)."""
        raise NotImplementedError

    @staticmethod
    def apply(row: dict, result: Any) -> None:
        """Write a validated ``result`` into ``row``'s columns (status changes such as ``kept`` included)."""
        raise NotImplementedError

    # -- derived -------------------------------------------------------------------------------------

    @classmethod
    def model(cls, stage1: Stage1Config) -> ModelConfig:
        return stage1.vlm if cls.vision else stage1.llm

    @property
    def generation(self) -> GenerationConfig:
        """Token budget and retry temperature of this call (``stage1.calls.<name>.generation``)."""
        return self.config.generation_for(self.name)

    def conversation(self, row: dict) -> list[dict]:
        """:meth:`messages` with ``stage1.system_prompt`` applied: what every engine sends for ``row``."""
        return apply_system_prompt([self.messages(self.config, row)], self.config.system_prompt)[0]

    # -- running -------------------------------------------------------------------------------------

    def process(self, rows: list[dict]) -> None:
        ready, images = self.load(rows)
        if not ready:
            return
        conversations = [self.conversation(row) for row in ready]
        results = self.generate(ready, conversations, images)
        for row, result in zip(ready, results, strict=True):
            if isinstance(result, OutputError):
                mark_error(row, self.name, str(result))
            else:
                self.apply(row, result)
        failed = sum(1 for row in rows if row["status"] == Status.ERROR.value)
        logger.debug("%s: %d rows, %d failed", type(self).__name__, len(rows), failed)

    def load(self, rows: list[dict]) -> tuple[list[dict], list[Image.Image] | None]:
        """Vision calls: the rows whose thumbnail decodes (the others fail here) and their images."""
        return load_thumbnails(rows, self.name) if self.vision else (rows, None)

    def generate(
        self, rows: list[dict], conversations: list[list[dict]], images: list[Image.Image] | None,
        result_model: type[BaseModel] | None = None,
    ) -> list[Any]:  # fmt: skip
        """Validated results (or :class:`OutputError`) of ``conversations``: ``k`` per row, row-major,
        each retried under a seed of its row's id (and its index among the row's ``k``)."""
        k = len(conversations) // len(rows)
        keys = [str(row["id"]) if k == 1 else f"{row['id']}#{j}" for row in rows for j in range(k)]
        return generate_validated(
            self.engine, conversations, images, result_model or self.result_model, self.generation,
            seeds=sampling_seeds(keys),
        )  # fmt: skip

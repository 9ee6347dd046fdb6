"""The template every stage-1 model call follows, whichever engine runs it.

A call declares, per subclass of :class:`ModelCallStage`, its pool (:meth:`~ModelCallStage.resources`),
whether it sees the image (``vision``), its result model and generation budget, how a row becomes a
conversation (:meth:`~ModelCallStage.messages`) and how a validated result lands in the row
(:meth:`~ModelCallStage.apply`). :meth:`ModelCallStage.process` runs them on whichever engine the call
uses (transformers, HTTP or vLLM): only the rows the stage ``wants`` reach the engine.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

from u2s.schema import Status, mark_error
from u2s.stage import Stage
from u2s.stage1.engines import Engine, build_engine, generate_validated
from u2s.stage1.prompts import apply_system_prompt
from u2s.stage1.rows import batch_seed, load_images
from u2s.stage1.schemas import OutputError

if TYPE_CHECKING:
    from PIL import Image
    from pydantic import BaseModel

    from u2s.config import GenerationConfig, ModelConfig, Resources, Stage1Config

logger = logging.getLogger(__name__)


class ModelCallStage(Stage):
    """One stage-1 model call: one conversation per wanted row, one validated result per conversation.

    Subclasses set ``name``, ``vision`` and ``result_model`` and implement :meth:`resources`,
    :meth:`generation`, :meth:`messages` and :meth:`apply`; the constructor (threads, config, engine)
    and :meth:`process` (images, system prompt, validated generation, per-row errors) are shared.
    """

    #: Whether the call sends the row's image (the VLM) or text only (the LLM).
    vision: ClassVar[bool]
    #: The pydantic model an answer must validate against (its JSON schema constrains decoding).
    result_model: ClassVar[type[BaseModel]]

    def __init__(self, stage1: Stage1Config, engine: Engine | None = None) -> None:
        from u2s.torch_utils import set_threads

        set_threads(self.resources(stage1).threads())
        self.config = stage1
        self.engine = engine or build_engine(stage1, self.model(stage1), vision=self.vision)

    # -- what each call declares ---------------------------------------------------------------------

    @staticmethod
    def resources(stage1: Stage1Config) -> Resources:
        """The pool this call runs in."""
        raise NotImplementedError

    @staticmethod
    def generation(stage1: Stage1Config) -> GenerationConfig:
        """Token budget and retry temperature of this call."""
        raise NotImplementedError

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

    @classmethod
    def conversation(cls, stage1: Stage1Config, row: dict) -> list[dict]:
        """:meth:`messages` with ``stage1.system_prompt`` applied: what every engine sends for ``row``."""
        return apply_system_prompt([cls.messages(stage1, row)], stage1.system_prompt)[0]

    # -- running ----------------------------------------------------------------------------------------

    def process(self, rows: list[dict]) -> None:
        ready, images = self.load(rows)
        if not ready:
            return
        conversations = [self.conversation(self.config, row) for row in ready]
        results = self.generate(ready, conversations, images)
        for row, result in zip(ready, results, strict=True):
            if isinstance(result, OutputError):
                mark_error(row, self.name, str(result))
            else:
                self.apply(row, result)
        failed = sum(1 for row in rows if row["status"] == Status.ERROR.value)
        logger.debug("%s: %d rows, %d failed", type(self).__name__, len(rows), failed)

    def load(self, rows: list[dict]) -> tuple[list[dict], list[Image.Image] | None]:
        """Vision calls: the rows whose image decodes (the others fail here) and their images."""
        return load_images(rows, self.name) if self.vision else (rows, None)

    def generate(
        self, rows: list[dict], conversations: list[list[dict]], images: list[Image.Image] | None,
        result_model: type[BaseModel] | None = None,
    ) -> list[Any]:  # fmt: skip
        """Validated results (or :class:`OutputError`) of ``conversations``, seeded from ``rows``."""
        return generate_validated(
            self.engine, conversations, images, result_model or self.result_model,
            self.generation(self.config), seed=batch_seed(rows),
        )  # fmt: skip

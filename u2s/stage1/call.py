"""The template every stage-1 model call follows, whichever engine runs it.

A call is declared once, as a :class:`~u2s.stage1.calls.CallSpec` in :data:`~u2s.stage1.calls.CALLS`:
which rows it wants (an Arrow mask), the columns it reads and writes, whether it sees the image
(``vision``), its result model, how a row becomes a conversation and how a validated result lands in
the row. Its engine, token budget and pool come from ``stage1.calls.<name>``. :class:`ModelCallStage`
runs a declaration as it is; a call with more behaviour (inspect's per-criterion mode, the fused call)
subclasses it. The base class owns the rest: thumbnails in, system-prompt policy, validated generation
with one sampled retry, per-row errors.
"""

from __future__ import annotations

import logging
import types
from typing import TYPE_CHECKING, Any, ClassVar

from u2s.schema import Status, mark_error
from u2s.stage import Stage, in_flight
from u2s.stage1.calls import CALLS, CallSpec, resolve
from u2s.stage1.engines import Engine, build_engine, generate_validated
from u2s.stage1.prompts import apply_system_prompt
from u2s.stage1.rows import load_thumbnails, sampling_seeds
from u2s.stage1.schemas import OutputError

if TYPE_CHECKING:
    import pyarrow as pa
    from PIL import Image
    from pydantic import BaseModel

    from u2s.config import GenerationConfig, ModelConfig, Stage1Config

logger = logging.getLogger(__name__)


class ModelCallStage(Stage):
    """One stage-1 model call: one conversation per wanted row, one validated result per conversation.

    A subclass names its call (``class InspectStage(ModelCallStage, call="inspect")``) and takes its
    ``name``, ``vision``, ``result_model`` and ``reads``/``writes`` from the call's declaration, unless it
    sets them itself; :meth:`messages`, :meth:`apply` and :meth:`wanted` default to the declaration's.
    ``engine``: a loaded engine to share (the calls of one pool share their model); default: load the
    engine ``stage1.calls.<name>`` names.
    """

    #: The call's declaration.
    spec: ClassVar[CallSpec]
    #: Whether the call sends the row's image (the VLM) or text only (the LLM).
    vision: ClassVar[bool]
    #: The pydantic model an answer must validate against (its JSON schema constrains decoding).
    result_model: ClassVar[type[BaseModel]]

    def __init_subclass__(cls, call: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if call is None:
            return
        cls.spec = spec = CALLS[call]
        declared = {"name": spec.name, "vision": spec.vision, "reads": spec.reads, "writes": spec.writes}
        for attribute, value in declared.items():
            if attribute not in cls.__dict__:
                setattr(cls, attribute, value)
        if "result_model" not in cls.__dict__:
            cls.result_model = spec.result_class()

    def __init__(self, stage1: Stage1Config, engine: Engine | None = None) -> None:
        self.config = stage1
        self.engine = engine or build_engine(
            stage1, stage1.engine_for(self.name), self.model(stage1), vision=self.vision
        )

    # -- what each call declares ---------------------------------------------------------------------

    @classmethod
    def messages(cls, stage1: Stage1Config, row: dict) -> list[dict]:
        """The chat messages asking this call's question about ``row`` (before the system-prompt policy)."""
        if cls.spec.messages is None:
            raise NotImplementedError(f"call {cls.spec.name} declares no messages")
        return cls.spec.messages(row, stage1.default_class_hint)

    @classmethod
    def apply(cls, row: dict, result: Any) -> None:
        """Write a validated ``result`` into ``row``'s columns (status changes such as ``kept`` included)."""
        if cls.spec.apply is None:
            raise NotImplementedError(f"call {cls.spec.name} declares no apply")
        cls.spec.apply(row, result)

    def wanted(self, batch: pa.Table) -> pa.ChunkedArray:
        """The rows the call has work for: its declaration's mask, else every row still in flight."""
        return self.spec.wanted(batch) if self.spec.wanted is not None else in_flight(batch)

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


def stage_class(call: str, mode: str) -> type[ModelCallStage]:
    """The stage class that runs ``call`` under ``stage1.mode`` ``mode``: the one its declaration names
    (imported here, on the worker), else a :class:`ModelCallStage` built for it."""
    spec = CALLS[call]
    stage = resolve(spec.stage_for(mode))
    if stage is None:
        title = "".join(part.title() for part in spec.name.split("_"))
        stage = types.new_class(f"{title}Stage", (ModelCallStage,), {"call": call})
        stage.__module__ = __name__
    return stage

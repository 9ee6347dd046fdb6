"""The engine interface every stage-1 backend implements, and the shared validate-and-retry loop."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

from u2s.healing import OutOfMemory, split_on_oom
from u2s.stage1.schemas import OutputError, Result, json_schema, parse_output

if TYPE_CHECKING:
    from collections.abc import Sequence

    from PIL import Image

    from u2s.config import GenerationConfig
    from u2s.stage1.engines.messages import SystemPrompt

logger = logging.getLogger(__name__)


class EngineError(Exception):
    """One row's request failed in transport (after the engine's own retries).

    Engines return it in place of that row's text; the message is content-free (status code, exception
    type), never the prompt or the output.
    """


@dataclass(frozen=True)
class Decoding:
    """How one :meth:`Engine.generate` call decodes: JSON schema, token budget, temperature, seeds.

    ``seeds`` holds one sampling seed per conversation (None: unseeded); greedy decoding ignores it.
    """

    schema: dict
    max_new_tokens: int
    temperature: float = 0.0
    seeds: tuple[int, ...] | None = None


class Engine(ABC):
    """A chat model that answers a batch of conversations with JSON constrained to a schema.

    ``system_prompt``: "system_role" keeps system messages as they are (a template or server that
    rejects them fails the call), "merge_into_user" always merges them into the first user turn,
    "auto" merges only once the model has rejected a system role (and keeps doing so).
    """

    def __init__(self, vision: bool, image_size: int = 448, system_prompt: SystemPrompt = "auto") -> None:
        self.vision = vision
        self.image_size = image_size
        self.system_prompt: SystemPrompt = system_prompt
        self._merge_system = system_prompt == "merge_into_user"

    def generate(
        self,
        conversations: list[list[dict]],
        images: list[Image.Image] | None,
        schema: dict,
        max_new_tokens: int,
        temperature: float = 0.0,
        seeds: Sequence[int] | None = None,
    ) -> list[str | EngineError]:
        """Raw output texts, one per conversation; an :class:`EngineError` where that row's request failed.

        ``conversations`` are OpenAI-style message lists (see :mod:`u2s.stage1.prompts`); ``images``
        holds one image per conversation for vision models (None for text models). Temperature 0
        decodes greedily; otherwise conversation ``i`` samples under ``seeds[i]`` when given, so its
        answer does not depend on which other conversations share the batch. A batch that runs out of
        device memory is split (:func:`~u2s.healing.split_on_oom`); a row that does not fit alone comes back
        as ``EngineError("out of memory")``.
        """
        if not conversations:
            return []
        if self.vision and (images is None or len(images) != len(conversations)):
            raise ValueError("a vision engine needs one image per conversation")
        if seeds is not None and len(seeds) != len(conversations):
            raise ValueError(f"{len(seeds)} seeds for {len(conversations)} conversations")
        seeds = None if seeds is None else tuple(seeds)

        def call(rows: list[int]) -> list[str | EngineError]:
            part = Decoding(
                schema, max_new_tokens, temperature, None if seeds is None else tuple(seeds[i] for i in rows)
            )
            part_images = None if images is None else [images[i] for i in rows]
            return self._generate([conversations[i] for i in rows], part_images, part)

        # Out of device memory, the batch runs again in halves; a row that does not fit alone fails.
        results = split_on_oom(call, list(range(len(conversations))))
        return [EngineError(r.reason) if isinstance(r, OutOfMemory) else r for r in results]

    @abstractmethod
    def _generate(
        self, conversations: list[list[dict]], images: list[Image.Image] | None, decoding: Decoding
    ) -> list[str | EngineError]:
        """:meth:`generate` on a non-empty batch (with one image per conversation on a vision engine)."""


def generate_validated(
    engine: Engine,
    conversations: list[list[dict]],
    images: list[Image.Image] | None,
    model_cls: type[Result],
    generation: GenerationConfig,
    seeds: Sequence[int] | None = None,
) -> list[Result | OutputError]:
    """Greedy pass, then one sampled retry (``generation.retry_temperature``) of rows that fail parsing.

    ``seeds``: one per conversation (see :func:`u2s.stage1.rows.sampling_seeds`), so a row's retry is
    the same whichever rows share its batch.

    Returns one parsed record or :class:`OutputError` per conversation; an error's message is
    ``invalid output after retry: <field problems>``, or ``request failed: <reason>`` for a row the
    engine returned as :class:`EngineError` (not retried here), and holds no generated text.
    """
    schema = json_schema(model_cls)
    texts = engine.generate(conversations, images, schema, generation.max_new_tokens, 0.0)
    results = [_parse(text, model_cls) for text in texts]
    # Transport failures are final (the engine has already retried them); only invalid outputs retry.
    failed = [
        i for i, (text, r) in enumerate(zip(texts, results, strict=True))
        if isinstance(r, OutputError) and not isinstance(text, EngineError)
    ]  # fmt: skip
    if not failed:
        return results
    logger.info("%s: %d of %d outputs invalid, retrying sampled", model_cls.__name__, len(failed), len(texts))
    retry = engine.generate(
        [conversations[i] for i in failed],
        [images[i] for i in failed] if images is not None else None,
        schema,
        generation.max_new_tokens,
        generation.retry_temperature,
        [seeds[i] for i in failed] if seeds is not None else None,
    )
    for i, text in zip(failed, retry, strict=True):
        results[i] = _parse(text, model_cls, "invalid output after retry: ")
    return results


def _parse(text: str | EngineError, model_cls: type[Result], prefix: str = "") -> Result | OutputError:
    """One engine answer → record, or :class:`OutputError` (``request failed: ...`` for transport errors)."""
    if isinstance(text, EngineError):
        return OutputError(f"request failed: {text}")
    try:
        return parse_output(text, model_cls)
    except OutputError as e:
        return OutputError(f"{prefix}{e}") if prefix else e

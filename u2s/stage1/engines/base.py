"""The engine interface every stage-1 backend implements, and the shared validate-and-retry loop."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from u2s.stage1.schemas import OutputError, Result, json_schema, parse_output

if TYPE_CHECKING:
    from PIL import Image

    from u2s.config import GenerationConfig

logger = logging.getLogger(__name__)


class Engine(ABC):
    """A chat model that answers a batch of conversations with JSON constrained to a schema."""

    @abstractmethod
    def generate(
        self,
        conversations: list[list[dict]],
        images: list[Image.Image] | None,
        schema: dict,
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> list[str]:
        """Raw output texts, one per conversation.

        ``conversations`` are OpenAI-style message lists (see :mod:`u2s.stage1.prompts`); ``images``
        holds one image per conversation for vision models (None for text models). Temperature 0
        decodes greedily; otherwise sampling is seeded with ``seed`` when given.
        """


def generate_validated(
    engine: Engine,
    conversations: list[list[dict]],
    images: list[Image.Image] | None,
    model_cls: type[Result],
    generation: GenerationConfig,
    seed: int | None = None,
) -> list[Result | OutputError]:
    """Greedy pass, then one sampled retry (``generation.retry_temperature``) of rows that fail parsing.

    Returns one parsed record or :class:`OutputError` per conversation; an error's message is
    ``invalid output after retry: <field problems>`` and holds no generated text.
    """
    schema = json_schema(model_cls)
    texts = engine.generate(conversations, images, schema, generation.max_new_tokens, 0.0)
    results: list[Result | OutputError] = []
    for text in texts:
        try:
            results.append(parse_output(text, model_cls))
        except OutputError as e:
            results.append(e)
    failed = [i for i, r in enumerate(results) if isinstance(r, OutputError)]
    if not failed:
        return results
    logger.info("%s: %d of %d outputs invalid, retrying sampled", model_cls.__name__, len(failed), len(texts))
    retry = engine.generate(
        [conversations[i] for i in failed],
        [images[i] for i in failed] if images is not None else None,
        schema,
        generation.max_new_tokens,
        generation.retry_temperature,
        seed,
    )
    for i, text in zip(failed, retry, strict=True):
        try:
            results[i] = parse_output(text, model_cls)
        except OutputError as e:
            results[i] = OutputError(f"invalid output after retry: {e}")
    return results

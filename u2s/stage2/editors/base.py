"""The interface every stage-2 editor implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from PIL import Image


class Editor(ABC):
    """An image editor that rewrites the private content of a batch of images.

    Subclasses set ``name`` (the registry key, recorded in each edited row's ``editor`` column) and are
    constructed with the job's :class:`~u2s.config.Stage2Config`; the constructor loads the model once
    (heavy imports go there, not at module import) and :meth:`edit` is then called once per batch.
    """

    name: ClassVar[str]

    @abstractmethod
    def edit(
        self,
        images: list[Image.Image],
        public_captions: list[str],
        instructions: list[str],
        seeds: list[int],
    ) -> list[Image.Image]:
        """Edit a batch of images; returns one RGB image per input, in order.

        Args:
            images: upright RGB images that all share one working size (the runner guarantees it).
            public_captions: per image, the privacy-preserving description of the scene (used by
                dual-condition and caption-driven editors; instruction-only editors may ignore it).
            instructions: per image, the edit instruction.
            seeds: per image, the seed of its random stream (63-bit, non-negative). An image's output
                must depend only on its own inputs and seed, so reruns reproduce it.

        The four lists have the same length. Outputs have the same size as the inputs. Captions and
        instructions are private: implementations must never log them.
        """

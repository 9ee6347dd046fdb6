"""The classic baselines as stage-2 editors: blur, pixelate or mask detected faces/text, or blur it all.

They are deterministic (prompts and seeds are ignored) and work at each image's native size
(``native_size``), so every pixel outside the detected boxes reaches the output untouched. An image
in which nothing is detected is returned unchanged; the runner still marks its row ``edited`` with this
editor's name, so "nothing to hide was found" is visible only by comparing images.
Settings come from :class:`~u2s.config.BaselineConfig` (``stage2.baseline``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from u2s.stage2 import baselines
from u2s.stage2.editors.base import Editor, EditPrompt

if TYPE_CHECKING:
    from PIL import Image

    from u2s.config import Stage2Config
    from u2s.stage2.detectors import Box


class _RegionEditor(Editor):
    """Detects the configured regions of each image and applies :meth:`apply` to them."""

    native_size: ClassVar[bool] = True

    def __init__(self, config: Stage2Config) -> None:
        from u2s.stage2.detectors import RegionDetector

        self.config = config.baseline
        self.detector = RegionDetector(config.baseline, threads=config.resources.threads())

    def apply(self, image: Image.Image, boxes: list[Box]) -> Image.Image:
        raise NotImplementedError

    def _edit(
        self, images: list[Image.Image], prompts: list[EditPrompt], seeds: list[int]
    ) -> list[Image.Image]:
        outputs = []
        for image in images:
            boxes = self.detector(image)
            outputs.append(self.apply(image, boxes) if boxes else image)
        return outputs


class BlurEditor(_RegionEditor):
    """Gaussian blur over each detected region (radius: ``blur_radius`` × the region's short side)."""

    name = "blur"

    def apply(self, image: Image.Image, boxes: list[Box]) -> Image.Image:
        return baselines.blur_regions(image, boxes, self.config.blur_radius)


class PixelateEditor(_RegionEditor):
    """Pixelation of each detected region (``pixel_size`` cells across its short side)."""

    name = "pixelate"

    def apply(self, image: Image.Image, boxes: list[Box]) -> Image.Image:
        return baselines.pixelate_regions(image, boxes, self.config.pixel_size)


class MaskEditor(_RegionEditor):
    """A solid ``mask_color`` box over each detected region."""

    name = "mask"

    def apply(self, image: Image.Image, boxes: list[Box]) -> Image.Image:
        return baselines.mask_regions(image, boxes, self.config.mask_color)


class BlurImageEditor(Editor):
    """Gaussian blur of the whole image (radius: ``blur_radius`` × the image's short side); no detectors."""

    name = "blur_image"
    native_size: ClassVar[bool] = True

    def __init__(self, config: Stage2Config) -> None:
        self.config = config.baseline

    def _edit(
        self, images: list[Image.Image], prompts: list[EditPrompt], seeds: list[int]
    ) -> list[Image.Image]:
        return [baselines.blur_image(image, self.config.blur_radius) for image in images]

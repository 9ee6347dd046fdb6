"""The classic baselines as stage-2 editors: blur, pixelate or mask detected faces/text, or blur it all.

They are deterministic (prompts and seeds are ignored) and work at each image's native size (the
default :meth:`~u2s.stage2.editors.base.Editor.working_size`), so every pixel outside the detected boxes
reaches the output untouched. An image in which nothing is detected is never published as it came:
``on_nothing_found`` blurs the whole image (``blur_image``, the default) or returns it unchanged
(``error``), which the runner turns into an error row.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from u2s.stage2.editors.base import Editor, EditorConfig, EditPrompt

if TYPE_CHECKING:
    from PIL import Image

    from u2s.config_base import StorageConfig
    from u2s.stage2.detectors import Box
    from u2s.stage2.editors.base import Stage2Settings

logger = logging.getLogger(__name__)


class RegionConfig(EditorConfig):
    """What the region baselines look for (dlib faces, rapidocr text lines) and what they do without it."""

    regions: list[Literal["faces", "text"]] = Field(["faces", "text"], description="What to hide.")
    padding: float = Field(0.15, ge=0, description="Boxes grow by this fraction of their size on each side.")
    face_upsample: int = Field(
        1, ge=0, description="dlib HOG detector upsampling passes (finds small faces)."
    )
    text_min_score: float = Field(0.5, ge=0, le=1, description="Minimum OCR detection score.")
    on_nothing_found: Literal["blur_image", "error"] = Field(
        "blur_image",
        description="An image with no region found: blur_image blurs the whole image "
        "(`fallback_blur_radius`); error leaves it unchanged, which makes its row an error row.",
    )
    fallback_blur_radius: float = Field(
        0.2, gt=0, description="Whole-image blur of on_nothing_found=blur_image: Gaussian radius as a "
        "fraction of the image's short side.",
    )  # fmt: skip

    def stage1_texts(self) -> frozenset[str]:
        return frozenset()


class BlurConfig(RegionConfig):
    """``stage2.blur``: Gaussian blur over each detected region."""

    blur_radius: float = Field(
        0.2,
        gt=0,
        description="Gaussian blur radius as a fraction of the region's short side "
        "(0.1 left a 60 px phone number OCR-readable; 0.15+ did not).",
    )


class PixelateConfig(RegionConfig):
    """``stage2.pixelate``: pixelation of each detected region."""

    pixel_size: int = Field(
        6, ge=2, description="Pixelation cells across the region's short side (7+ left text OCR-readable)."
    )


class MaskConfig(RegionConfig):
    """``stage2.mask``: a solid box over each detected region."""

    mask_color: tuple[int, int, int] = Field((0, 0, 0), description="Solid mask colour (RGB).")


class BlurImageConfig(EditorConfig):
    """``stage2.blur_image``: Gaussian blur of the whole image, no detectors."""

    blur_radius: float = Field(
        0.2, gt=0, description="Gaussian blur radius as a fraction of the image's short side."
    )

    def stage1_texts(self) -> frozenset[str]:
        return frozenset()


class _RegionEditor(Editor):
    """Detects the configured regions of each image and applies :meth:`apply` to them."""

    config: RegionConfig
    output_format: ClassVar[str] = "PNG"  # lossless: every pixel outside the regions stays exact

    def __init__(self, stage2: Stage2Settings, storage: StorageConfig | None = None) -> None:
        from u2s.stage2.detectors import RegionDetector

        super().__init__(stage2, storage)
        self.detector = RegionDetector(self.config, threads=stage2.resources.threads())

    def apply(self, image: Image.Image, boxes: list[Box]) -> Image.Image:
        raise NotImplementedError

    def _edit(
        self, images: list[Image.Image], prompts: list[EditPrompt], seeds: list[int]
    ) -> list[Image.Image]:
        from u2s.stage2 import baselines

        outputs, nothing_found = [], 0
        for image in images:
            boxes = self.detector(image)
            if boxes:
                outputs.append(self.apply(image, boxes))
                continue
            nothing_found += 1
            if self.config.on_nothing_found == "blur_image":
                outputs.append(baselines.blur_image(image, self.config.fallback_blur_radius))
            else:  # "error": unchanged, which the runner never publishes
                outputs.append(image)
        if nothing_found:
            logger.info(
                "%s: no region found in %d of %d images (on_nothing_found: %s)",
                self.name, nothing_found, len(images), self.config.on_nothing_found,
            )  # fmt: skip
        return outputs


class BlurEditor(_RegionEditor):
    """Gaussian blur over each detected region (radius: ``blur_radius`` × the region's short side)."""

    name = "blur"
    config_class = BlurConfig
    config: BlurConfig

    def apply(self, image: Image.Image, boxes: list[Box]) -> Image.Image:
        from u2s.stage2 import baselines

        return baselines.blur_regions(image, boxes, self.config.blur_radius)


class PixelateEditor(_RegionEditor):
    """Pixelation of each detected region (``pixel_size`` cells across its short side)."""

    name = "pixelate"
    config_class = PixelateConfig
    config: PixelateConfig

    def apply(self, image: Image.Image, boxes: list[Box]) -> Image.Image:
        from u2s.stage2 import baselines

        return baselines.pixelate_regions(image, boxes, self.config.pixel_size)


class MaskEditor(_RegionEditor):
    """A solid ``mask_color`` box over each detected region."""

    name = "mask"
    config_class = MaskConfig
    config: MaskConfig

    def apply(self, image: Image.Image, boxes: list[Box]) -> Image.Image:
        from u2s.stage2 import baselines

        return baselines.mask_regions(image, boxes, self.config.mask_color)


class BlurImageEditor(Editor):
    """Gaussian blur of the whole image (radius: ``blur_radius`` × the image's short side); no detectors."""

    name = "blur_image"
    config_class = BlurImageConfig
    config: BlurImageConfig

    def _edit(
        self, images: list[Image.Image], prompts: list[EditPrompt], seeds: list[int]
    ) -> list[Image.Image]:
        from u2s.stage2 import baselines

        return [baselines.blur_image(image, self.config.blur_radius) for image in images]

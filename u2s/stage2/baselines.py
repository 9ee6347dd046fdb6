"""Classic anonymization baselines: blur, pixelate or mask boxes, or blur the whole image.

Pure functions of a PIL image and boxes ``(left, top, right, bottom)`` (right/bottom exclusive, see
:mod:`u2s.stage2.detectors`). Each returns a new RGB image of the same size and leaves the input
alone; every pixel outside the boxes is copied exactly. Overlapping boxes are processed in order.
Outputs carry pixels only: nothing of the input's ``info`` (ICC profile, EXIF, a JPEG comment), which
Pillow's encoders would otherwise write into the published file under any metadata policy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageFilter

from u2s.stage2.detectors import Box, clip_box


def _pixels(image: Image.Image) -> Image.Image:
    """A new RGB image of ``image``'s pixels and nothing else.

    ``convert`` copies ``info``, and encoders read it: Pillow's JPEG writer takes its comment from
    ``info["comment"]``, the PNG and WebP writers their ICC profile from ``info["icc_profile"]``.
    """
    out = image.convert("RGB")
    out.info = {}
    return out


def _boxes(image: Image.Image, boxes: Sequence[Box]) -> list[Box]:
    """The non-empty boxes, clipped to the image."""
    clipped = (clip_box(box, image.width, image.height) for box in boxes)
    return [box for box in clipped if box is not None]


def blur_regions(image: Image.Image, boxes: Sequence[Box], blur_radius: float = 0.1) -> Image.Image:
    """Gaussian-blur each box; the radius is ``blur_radius`` × the box's short side.

    The blur reads a margin of surrounding pixels (so a box's border does not smear its own edge
    pixels inwards) but only the box is written.
    """
    out = _pixels(image)
    for left, top, right, bottom in _boxes(out, boxes):
        radius = blur_radius * min(right - left, bottom - top)
        margin = math.ceil(3 * radius)
        ctx = clip_box((left - margin, top - margin, right + margin, bottom + margin), out.width, out.height)
        assert ctx is not None  # contains the non-empty box
        blurred = out.crop(ctx).filter(ImageFilter.GaussianBlur(radius))
        inner = (left - ctx[0], top - ctx[1], right - ctx[0], bottom - ctx[1])
        out.paste(blurred.crop(inner), (left, top))
    return out


def pixelate_regions(image: Image.Image, boxes: Sequence[Box], pixel_size: int = 12) -> Image.Image:
    """Pixelate each box: ``pixel_size`` cells across its short side (fewer if the side is shorter),
    square-ish cells along the long side; each cell is its pixels' mean, upsampled with nearest."""
    out = _pixels(image)
    for left, top, right, bottom in _boxes(out, boxes):
        width, height = right - left, bottom - top
        short = min(width, height)
        cells = min(pixel_size, short)
        grid = (max(1, round(width * cells / short)), max(1, round(height * cells / short)))
        region = out.crop((left, top, right, bottom))
        small = region.resize(grid, Image.Resampling.BOX)
        out.paste(small.resize((width, height), Image.Resampling.NEAREST), (left, top))
    return out


def mask_regions(
    image: Image.Image, boxes: Sequence[Box], mask_color: tuple[int, int, int] = (0, 0, 0)
) -> Image.Image:
    """Fill each box with a solid ``mask_color`` (RGB)."""
    out = _pixels(image)
    for left, top, right, bottom in _boxes(out, boxes):
        out.paste(tuple(mask_color), (left, top, right, bottom))
    return out


def blur_image(image: Image.Image, blur_radius: float = 0.1) -> Image.Image:
    """Gaussian-blur the whole image; the radius is ``blur_radius`` × the image's short side."""
    out = _pixels(image)
    return out.filter(ImageFilter.GaussianBlur(blur_radius * min(out.size)))

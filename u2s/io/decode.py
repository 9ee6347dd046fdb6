"""Decoding and validation of image bytes into upright 8-bit RGB."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps


class DecodeError(ValueError):
    """Bytes that cannot become an image; the message is a short, content-free reason."""


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB. Transparency is composited over white; 16/32-bit is rescaled."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def load_rgb(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Decode ``data`` to an upright (EXIF-transposed) 8-bit RGB image, fully loaded.

    Raises :class:`DecodeError` for empty, truncated or non-image bytes and for images with more than
    ``max_pixels`` pixels (checked from the header, before any pixel is decoded).
    """
    if not data:
        raise DecodeError("empty file")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise DecodeError("image exceeds the pixel limit") from e
    except Exception as e:  # PIL raises UnidentifiedImageError, SyntaxError, ValueError... by format
        raise DecodeError("not an image") from e
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        raise DecodeError(f"image too large: {width}x{height} exceeds the {max_pixels}-pixel limit")
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except Image.DecompressionBombError as e:
        raise DecodeError("image exceeds the pixel limit") from e
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt pixel data
        raise DecodeError(f"corrupt or truncated image data ({type(e).__name__})") from e

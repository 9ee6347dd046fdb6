"""Decoding and validation of image bytes into upright 8-bit RGB, and the pipeline's decode stage."""

from __future__ import annotations

import io
import logging

import numpy as np
from PIL import Image

from u2s.config import DecodeConfig
from u2s.schema import mark_error
from u2s.stage import Stage

logger = logging.getLogger(__name__)

#: Pillow formats accepted from datasets, tried in this order. Everything else is refused: EPS would run
#: Ghostscript on untrusted bytes, and formats without a magic number (TGA) would accept arbitrary data.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM", "ICO", "JPEG2000", "AVIF", "QOI")

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class DecodeError(ValueError):
    """Bytes that cannot become an image; the message is a short, content-free reason."""


def _available_formats() -> tuple[str, ...]:
    Image.init()
    return tuple(f for f in FORMATS if f in Image.OPEN)


def _wide_to_l(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer / float single-channel → 8-bit L, rescaled (never clipped to white)."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        top = 65535.0
    elif img.mode == "F" and arr.size and np.nanmax(arr) <= 1.0:
        top = 1.0  # float images in [0, 1]
    else:  # 32-bit ints / floats: 8-bit range unless the data says 16-bit
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
    arr = np.nan_to_num(np.clip(arr / top * 255.0, 0, 255)).round().astype(np.uint8)
    return Image.fromarray(arr, mode="L")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB. Transparency is composited over white; 16/32-bit is rescaled."""
    if img.mode in _WIDE_MODES:
        return _wide_to_l(img).convert("RGB")
    if img.mode in ("P", "L", "RGB") and "transparency" in img.info:
        img = img.convert("RGBA")  # palette / tRNS transparency → alpha
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


_EXIF_ORIENTATION = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def exif_orientation(exif: Image.Exif) -> int:
    """The orientation :func:`load_rgb` applies for ``exif``: 2..8, or 1 when absent or invalid.

    Pillow's ``getexif`` also reads ``tiff:Orientation`` from an XMP packet when the EXIF has none.
    """
    value = exif.get(_EXIF_ORIENTATION, 1)
    return value if isinstance(value, int) and value in _TRANSPOSE else 1


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation to the pixels.

    Unlike ``ImageOps.exif_transpose`` this never rewrites the EXIF block (the pixels are all that is
    kept), so a malformed block elsewhere in the EXIF cannot fail the image; an unreadable orientation
    leaves the image as stored.
    """
    try:
        orientation = exif_orientation(img.getexif())
    except Exception:  # PIL raises many types on broken EXIF blocks
        logger.debug("ignoring unreadable EXIF")
        return img
    return img.transpose(_TRANSPOSE[orientation]) if orientation != 1 else img


def load_rgb(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Decode ``data`` to an upright (EXIF-transposed) 8-bit RGB image, fully loaded.

    Raises :class:`DecodeError` for empty, truncated or non-image bytes, unsupported formats and colour
    modes, and for images with more than ``max_pixels`` pixels (checked from the header, before any pixel
    is decoded).
    """
    if not data:
        raise DecodeError("empty file")
    try:
        img = Image.open(io.BytesIO(data), formats=_available_formats())
    except Image.DecompressionBombError as e:
        raise DecodeError("image exceeds the pixel limit") from e
    except Exception as e:  # PIL raises UnidentifiedImageError, SyntaxError, ValueError... by format
        raise DecodeError("not an image (or an unsupported format)") from e
    width, height = img.size
    if width < 1 or height < 1:
        raise DecodeError(f"image has no pixels: {width}x{height}")
    if max_pixels is not None and width * height > max_pixels:
        raise DecodeError(f"image too large: {width}x{height} exceeds the {max_pixels}-pixel limit")
    try:
        img.load()
    except Image.DecompressionBombError as e:
        raise DecodeError("image exceeds the pixel limit") from e
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:  # truncated or corrupt pixel data
        raise DecodeError(f"corrupt or truncated image data ({type(e).__name__})") from e
    img = _upright(img)
    try:
        return _to_rgb(img)
    except (OSError, ValueError) as e:  # e.g. LAB / YCbCr-with-alpha modes Pillow cannot convert
        raise DecodeError(f"unsupported colour mode {img.mode}") from e


#: Encoding of the VLM thumbnail decode writes once per row (visually lossless at a few tens of KB).
THUMBNAIL_QUALITY = 95


def thumbnail(img: Image.Image, side: int) -> bytes:
    """``img`` downscaled to fit ``side``×``side`` (aspect kept, never upscaled), as a JPEG."""
    width, height = img.size
    scale = side / max(width, height)
    if scale < 1:
        img = img.resize(
            (max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BICUBIC
        )
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=THUMBNAIL_QUALITY)
    return buf.getvalue()


class DecodeStage(Stage):
    """Validate each row's image once, at full resolution; bad rows get ``decode`` errors.

    For every image that decodes it records the upright size, writes the VLM thumbnail (stage 1 never
    touches the full-size bytes again) and, with ``metadata="strip"``, replaces the bytes with the
    publishable file: same pixels, no metadata (:func:`u2s.io.metadata.strip_metadata`), named
    ``{id}.{ext}`` (never the source path).
    """

    name = "decode"
    reads = ("image",)
    writes = ("image", "width", "height", "thumbnail", "metadata_removed")

    def __init__(self, decode: DecodeConfig, thumbnail_side: int, metadata: str = "strip") -> None:
        self.config = decode
        self.thumbnail_side = thumbnail_side
        self.metadata = metadata

    def check(self, data: bytes | None) -> Image.Image:
        """The upright RGB image of ``data``; raises :class:`DecodeError` when it breaks a limit."""
        if data is None:
            raise DecodeError("no image bytes")
        if len(data) > self.config.max_bytes:
            raise DecodeError(
                f"file too large: {len(data)} bytes exceeds the {self.config.max_bytes}-byte limit"
            )
        return load_rgb(data, max_pixels=self.config.max_pixels)

    def process(self, rows: list[dict]) -> None:
        for row in rows:
            data = (row["image"] or {}).get("bytes")
            try:
                img = self.check(data)
            except DecodeError as e:
                mark_error(row, self.name, str(e))
                continue
            row["width"], row["height"] = img.size
            row["thumbnail"] = thumbnail(img, self.thumbnail_side)
            if self.metadata == "strip":
                from u2s.io.metadata import strip_metadata

                # The decoded pixels are reused if the file must be re-encoded: still one full decode.
                stripped = strip_metadata(data, max_pixels=self.config.max_pixels, decoded=img)
                data, extension, row["metadata_removed"] = stripped.data, stripped.extension, stripped.removed
            else:
                with Image.open(io.BytesIO(data)) as original:  # the header only: its format's extension
                    extension = _EXTENSIONS.get(original.format or "", "img")
            img.close()
            row["image"] = {"bytes": data, "path": f"{row['id']}.{extension}"}


#: File extensions of the formats decode accepts, for the published file's name.
_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif",
               "PPM": "ppm", "ICO": "ico", "JPEG2000": "jp2", "AVIF": "avif", "QOI": "qoi"}  # fmt: skip

"""Decoding and validation of image bytes into upright 8-bit RGB (its stage: :mod:`u2s.io.decode_stage`)."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

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


def _zero_hidden(img: Image.Image) -> tuple[Image.Image, bool]:
    """``img`` (a mode with alpha, or with ``tRNS``/palette transparency) as RGBA, or LA for grey, with
    the colour of every fully transparent pixel set to 0; and whether any such pixel had a colour.

    A pixel with alpha 0 shows nothing in a browser, yet ``convert("RGB")`` (what most training loaders
    run) shows its colour: text or a face can hide there. Zeroing it changes no visible pixel.
    """
    work = img.convert("LA") if img.mode in ("LA", "La") else img.convert("RGBA")
    arr = np.array(work)  # a writable copy
    hidden = arr[..., -1] == 0
    if not arr[..., :-1][hidden].any():
        return work, False
    arr[..., :-1][hidden] = 0
    return Image.fromarray(arr), True


def _to_rgb(img: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """Any PIL mode → 8-bit RGB, and the image with alpha whose hidden colour was zeroed (or None).

    16/32-bit is rescaled. An image with transparency (alpha, palette or ``tRNS``) has the colour under
    alpha 0 zeroed (:func:`_zero_hidden`), then its alpha dropped, not composited: the VLM sees exactly
    what ``convert("RGB")`` of the published file shows. That view holds every pixel's colour, including
    the colour of half-transparent pixels that a composite over white would wash out, and after zeroing
    a fully transparent pixel shows black, so nothing a loader can show goes uninspected.
    """
    if img.mode in _WIDE_MODES:
        return _wide_to_l(img).convert("RGB"), None
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        work, changed = _zero_hidden(img)
        return work.convert("RGB"), work if changed else None
    return (img.convert("RGB") if img.mode != "RGB" else img), None


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


def _open(data: bytes, max_pixels: int | None) -> Image.Image:
    """``data`` opened (header only) and checked: an image, of a known format, within ``max_pixels``."""
    if not data:
        raise DecodeError("empty file")
    try:
        img = Image.open(io.BytesIO(data), formats=_available_formats())
    except Image.DecompressionBombError as e:
        raise DecodeError("image exceeds the pixel limit") from e
    except Exception as e:  # PIL raises UnidentifiedImageError, SyntaxError, ValueError... by format
        raise DecodeError("not an image (or an unsupported format)") from e
    _check_size(img, max_pixels)
    return img


def _check_size(img: Image.Image, max_pixels: int | None) -> None:
    width, height = img.size
    if width < 1 or height < 1:
        raise DecodeError(f"image has no pixels: {width}x{height}")
    if max_pixels is not None and width * height > max_pixels:
        raise DecodeError(f"image too large: {width}x{height} exceeds the {max_pixels}-pixel limit")


def _frame(img: Image.Image, reduce: _Reduce | None = None) -> tuple[Image.Image, Image.Image | None]:
    """The current frame of ``img``: loaded, upright, as :func:`_to_rgb` gives it, with no ``info``;
    resized as ``reduce`` (from :func:`_draft`) says before it is made upright.

    Nothing the file says besides its pixels travels with the result: encoders read ``info`` (Pillow's
    JPEG writer takes its comment from there, PNG and WebP writers their ICC profile), so an image made
    from these pixels and saved carries nothing of the input's metadata.
    """
    try:
        img.load()
    except Image.DecompressionBombError as e:
        raise DecodeError("image exceeds the pixel limit") from e
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:  # truncated or corrupt pixel data
        raise DecodeError(f"corrupt or truncated image data ({type(e).__name__})") from e
    if reduce is not None:
        img = img.resize(reduce.size, reduce.resample, box=reduce.box)
    img = _upright(img)
    try:
        rgb, transparent = _to_rgb(img)
    except (OSError, ValueError) as e:  # e.g. LAB / YCbCr-with-alpha modes Pillow cannot convert
        raise DecodeError(f"unsupported colour mode {img.mode}") from e
    rgb.info = {}
    if transparent is not None:
        transparent.info = {}
    return rgb, transparent


#: The size a caller needs, from the upright size of the file: (width, height) → (width, height).
Sizer = Callable[[int, int], tuple[int, int]]
#: Formats whose decoder scales while decoding (libjpeg's DCT scaling by 1/2, 1/4 or 1/8).
_DCT_SCALED = ("JPEG", "MPO")


@dataclass(frozen=True)
class _Reduce:
    """A resize of the loaded frame: to ``size`` (as stored) from ``box`` of the (DCT-scaled) pixels."""

    size: tuple[int, int]
    box: tuple[float, float, float, float]
    resample: Image.Resampling


def _swaps(img: Image.Image) -> bool:
    """Whether :func:`_upright` exchanges the width and height of ``img`` (orientations 5 to 8)."""
    try:
        return exif_orientation(img.getexif()) >= 5
    except Exception:  # _upright keeps such an image as stored
        return False


def _draft(img: Image.Image, size: Sizer, resample: Image.Resampling) -> _Reduce | None:
    """Set up ``img`` (opened, not loaded) to decode at the smallest DCT scale that still covers the
    upright size ``size`` asks for, and the resize to that size; None to decode in full, as stored.

    Only a JPEG whose target is smaller in both dimensions is reduced. libjpeg-turbo then runs a
    scaled inverse DCT (e.g. 8×8 coefficients → 1×1 pixel at 1/8): the entropy decode still reads
    every byte (a truncated file still fails), but most of the pixel work and memory go away.
    """
    if img.format not in _DCT_SCALED:
        return None
    swap = _swaps(img)
    width, height = img.size
    target = size(*((height, width) if swap else (width, height)))
    target = (target[1], target[0]) if swap else target
    if not (0 < target[0] < width and 0 < target[1] < height):
        return None
    drafted = img.draft(None, target)
    box = drafted[1] if drafted is not None else (0.0, 0.0, float(width), float(height))
    return _Reduce(target, box, resample)


def _frame_count(img: Image.Image) -> int:
    try:
        return max(1, int(getattr(img, "n_frames", 1)))
    except Exception as e:  # the frame walk hit a corrupt frame: which frames exist is unknown
        raise DecodeError(f"corrupt or truncated image data ({type(e).__name__})") from e


@dataclass
class Decoded:
    """An input image as decode inspects it, and what publishing it needs to know.

    "The inspected frame" is frame 0 as Pillow opens the file: a still image's only frame, the first
    frame of a GIF, WebP animation or multi-page TIFF, the first image of an MPO, and an APNG's default
    image (its ``IDAT``, which is also the animation's first frame unless the file says otherwise).
    """

    image: Image.Image
    """Frame 0, upright 8-bit RGB: the VLM's view and what ``convert("RGB")`` of the published file shows;
    at the size the decode asked for when it was decoded reduced (:attr:`reduced`)."""
    transparent: Image.Image | None
    """Frame 0, upright RGBA (LA for grey) with its hidden colour zeroed, when it had any; else None."""
    frames: int
    """Frames in the file (1 for a still image)."""
    format: str
    """Pillow's name of the file's format (``JPEG``, ``PNG``, ``MPO``...)."""
    all_frames: bool = False
    """Every frame was decoded and inspected (``decode.frames: all``), not only frame 0."""
    hidden: bool = False
    """Some decoded frame had colour under alpha 0."""
    size: tuple[int, int] = (0, 0)
    """Upright size of frame 0 in the file (``image.size`` unless :attr:`reduced`)."""

    def __post_init__(self) -> None:
        if self.size == (0, 0):
            self.size = self.image.size

    @property
    def reduced(self) -> bool:
        """``image`` was decoded at a reduced size (see :func:`decode_image`'s ``size``)."""
        return self.image.size != self.size

    def close(self) -> None:
        self.image.close()
        if self.transparent is not None:
            self.transparent.close()


def decode_image(
    data: bytes,
    max_pixels: int | None = None,
    *,
    size: Sizer | None = None,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> Decoded:
    """Decode frame 0 of ``data`` (see :class:`Decoded`) and count its frames.

    ``size``: the upright size the caller needs, given the file's upright size (e.g. the VLM thumbnail
    that fits a square). A JPEG it shrinks is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that
    covers it and resized to exactly that size with ``resample``: a fraction of a full decode's work,
    and the pixels differ from a full decode resized the same way by about a grey level on average
    (``tests/io/test_thumbnail.py``). Other formats, and sizes that do not shrink, decode in full.

    Raises :class:`DecodeError` for empty, truncated or non-image bytes, unsupported formats and colour
    modes, and for images with more than ``max_pixels`` pixels (checked from the header, before any pixel
    is decoded).
    """
    img = _open(data, max_pixels)
    frames = _frame_count(img)
    if frames > 1:
        img.seek(0)  # counting frames may have moved the file to another one
    full = img.size
    reduce = _draft(img, size, resample) if size is not None else None
    rgb, transparent = _frame(img, reduce)
    upright = rgb.size if reduce is None else full[::-1] if _swaps(img) else full
    return Decoded(rgb, transparent, frames, img.format or "", hidden=transparent is not None, size=upright)


def later_frames(
    data: bytes, frames: int, max_pixels: int | None = None
) -> Iterator[tuple[Image.Image, bool]]:
    """Frames 1 .. ``frames``-1 of ``data`` one at a time, each as :func:`decode_image` gives frame 0
    (upright RGB), with whether it had colour under alpha 0. A frame is valid only until the next one.

    Frames are what a player shows: Pillow composites APNG, GIF and WebP frames onto their canvas.
    Raises :class:`DecodeError` like :func:`decode_image`, also for a frame larger than ``max_pixels``.
    """
    img = _open(data, max_pixels)
    for index in range(1, frames):
        try:
            img.seek(index)
        except Exception as e:  # a frame the header promised is missing or corrupt
            raise DecodeError(f"corrupt or truncated image data ({type(e).__name__})") from e
        _check_size(img, max_pixels)
        rgb, transparent = _frame(img)
        yield rgb, transparent is not None


def load_rgb(
    data: bytes,
    max_pixels: int | None = None,
    *,
    size: Sizer | None = None,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> Image.Image:
    """Decode ``data`` to an upright (EXIF-transposed) 8-bit RGB image of its frame 0, fully loaded.

    Transparency is not composited: the colour of fully transparent pixels is zeroed and alpha dropped
    (see :func:`_to_rgb`). The image has an empty ``info``. ``size`` and ``resample``: a JPEG decoded
    reduced, as :func:`decode_image` does. Raises :class:`DecodeError` as :func:`decode_image` does.
    """
    decoded = decode_image(data, max_pixels, size=size, resample=resample)
    if decoded.transparent is not None:
        decoded.transparent.close()
    return decoded.image


#: Encoding of the VLM thumbnail decode writes once per row (visually lossless at a few tens of KB).
THUMBNAIL_QUALITY = 95


def fit(width: int, height: int, side: int) -> tuple[int, int]:
    """``width``×``height`` downscaled to fit ``side``×``side`` (aspect kept, never upscaled)."""
    scale = side / max(width, height)
    if scale >= 1:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def thumbnail(img: Image.Image, side: int) -> bytes:
    """``img`` downscaled to fit ``side``×``side`` (aspect kept, never upscaled), as a JPEG.

    An image decoded with ``decode_image(..., size=thumbnail_size(side))`` is already that size."""
    target = fit(*img.size, side)
    if target != img.size:
        img = img.resize(target, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=THUMBNAIL_QUALITY)
    return buf.getvalue()


def thumbnail_size(side: int) -> Sizer:
    """The :data:`Sizer` of :func:`thumbnail`'s size: decode a JPEG straight to its VLM thumbnail."""
    return lambda width, height: fit(width, height, side)


#: File extensions of the formats decode accepts, for the published file's name.
EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp",
              "TIFF": "tif", "PPM": "ppm", "ICO": "ico", "JPEG2000": "jp2", "AVIF": "avif",
              "QOI": "qoi"}  # fmt: skip

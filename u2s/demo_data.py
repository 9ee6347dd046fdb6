"""The demo's sample dataset, built offline from images that ship with scikit-image, scikit-learn and Pillow.

``write_sample_dataset(out_dir)`` writes ~20 small files in five subfolders: real photos (a face, scenes),
Pillow-rendered private text (a name badge, a phone number, a licence plate), format edge cases that must
decode to upright RGB (CMYK, RGBA, palette, 16-bit, EXIF-rotated) and broken inputs that must become error
rows. Everything is deterministic: two runs give byte-identical files.

Run ``python -m u2s.demo_data OUT_DIR`` to write the folder and print its table.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: Long side, in pixels, of every downscaled photo (the demo runs tiny CPU models).
MAX_SIDE = 256
#: The subfolders this module owns under ``out_dir``; they are removed and rewritten on every call.
SUBFOLDERS = ("people", "text", "scenes", "formats", "broken")
#: EXIF tag id of Orientation.
EXIF_ORIENTATION = 0x0112

_JPEG_QUALITY = 90


@dataclass(frozen=True)
class SampleImage:
    """One sample file: its path, what it shows or tests (``kind``), and whether decoding should succeed."""

    path: Path
    kind: str
    expected: str  # "image" (decodes to an upright RGB image) or "error" (must become an error row)


# ----------------------------------------------------------------------------------------------- sources


def _photo(arr: np.ndarray, max_side: int = MAX_SIDE) -> Image.Image:
    """A uint8 array → PIL image, downscaled so its long side is at most ``max_side``."""
    img = Image.fromarray(np.ascontiguousarray(arr))
    if max(img.size) > max_side:
        scale = max_side / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS)
    return img


def _skimage(name: str) -> np.ndarray:
    """A bundled scikit-image sample (these ship in the wheel; no download)."""
    from skimage import data

    return getattr(data, name)()


def _sklearn(name: str) -> np.ndarray:
    """A bundled scikit-learn sample image ("china.jpg" or "flower.jpg")."""
    from sklearn.datasets import load_sample_image

    return load_sample_image(name)


# ---------------------------------------------------------------------------------------- rendered text


def _text_mask(text: str, size: int, stroke: int = 0) -> Image.Image:
    """``text`` as a tight "L" mask whose font is ``size`` px (Pillow's bundled scalable font).

    Without FreeType, Pillow's bitmap font is rendered and scaled up so the text stays OCR-sized.
    """
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):  # Pillow built without FreeType: bitmap font
        return _scaled_bitmap_mask(text, font, size)
    left, top, right, bottom = font.getbbox(text, stroke_width=stroke)
    mask = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, font=font, fill=255, stroke_width=stroke, stroke_fill=255)
    return mask


def _scaled_bitmap_mask(text: str, font: ImageFont.ImageFont, size: int) -> Image.Image:
    """``text`` in Pillow's small bitmap font, scaled up (nearest) to roughly a ``size``-px font."""
    left, top, right, bottom = font.getbbox(text)
    small = Image.new("L", (int(right - left), int(bottom - top)), 0)
    ImageDraw.Draw(small).text((-left, -top), text, font=font, fill=255)
    factor = max(1, round(size * 0.75 / max(1, small.height)))
    return small.resize((small.width * factor, small.height * factor), Image.Resampling.NEAREST)


def _put_text(
    img: Image.Image,
    text: str,
    size: int,
    center: tuple[int, int],
    fill: tuple[int, int, int],
    stroke: int = 0,
) -> None:
    """Draw ``text`` centred on ``center`` (in place)."""
    mask = _text_mask(text, size, stroke)
    xy = (center[0] - mask.width // 2, center[1] - mask.height // 2)
    img.paste(Image.new("RGB", mask.size, fill), xy, mask)


def _name_badge() -> Image.Image:
    """A conference-style name badge: "Jane Doe", "Acme Corp"."""
    img = Image.new("RGB", (480, 200), (255, 255, 255))
    ImageDraw.Draw(img).rectangle((4, 4, 475, 195), outline=(40, 40, 120), width=4)
    _put_text(img, "Jane Doe", 72, (240, 72), (10, 10, 10))
    _put_text(img, "Acme Corp", 56, (240, 148), (40, 40, 120))
    return img


def _phone_number() -> Image.Image:
    """A phone number on a plain background."""
    img = Image.new("RGB", (540, 200), (250, 250, 245))
    _put_text(img, "+1 555 0123 4567", 60, (270, 100), (0, 0, 0))
    return img


def _licence_plate() -> Image.Image:
    """A UK-style licence plate box with "AB12 CDE" on a plain grey background."""
    img = Image.new("RGB", (480, 200), (150, 150, 150))
    ImageDraw.Draw(img).rounded_rectangle(
        (20, 30, 459, 169), radius=14, fill=(250, 210, 20), outline=(0, 0, 0), width=5
    )
    _put_text(img, "AB12 CDE", 88, (240, 100), (0, 0, 0), stroke=1)
    return img


# ------------------------------------------------------------------------------------------ format cases


def _astronaut_landscape() -> Image.Image:
    """The astronaut's upper body (face included) as a 256×192 landscape image."""
    return _photo(_skimage("astronaut")[:384])


def _exif_rotated_jpeg() -> bytes:
    """A JPEG whose pixels are stored sideways with EXIF orientation 6 (display = rotate 90° clockwise)."""
    upright = _astronaut_landscape()
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # orientation 6 undoes this with ROTATE_270
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    return _encode(stored, "JPEG", quality=_JPEG_QUALITY, exif=exif.tobytes())


def _rgba_png() -> Image.Image:
    """Chelsea the cat inside an opaque disc, a half-transparent ring around it, transparent corners."""
    img = _photo(_skimage("chelsea")).convert("RGBA")
    w, h = img.size
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot((xx - w / 2) / (w / 2), (yy - h / 2) / (h / 2))
    alpha = np.where(r < 0.8, 255, np.where(r < 1.0, 128, 0)).astype(np.uint8)
    img.putalpha(Image.fromarray(alpha))
    return img


def _palette(colors: int, transparent_index: int | None = None) -> Image.Image:
    """The coffee photo quantised to a ``colors``-entry palette ("P" mode)."""
    img = _photo(_skimage("coffee")).quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    if transparent_index is not None:
        img.info["transparency"] = transparent_index
    return img


def _gray16() -> Image.Image:
    """A 16-bit grayscale image ("I;16") using the full 0..65535 range: camera × 257 plus a fine ramp."""
    cam = np.asarray(_photo(_skimage("camera")), dtype=np.uint32)
    ramp = np.linspace(0, 256, cam.shape[1], endpoint=False, dtype=np.float64).astype(np.uint32)
    arr = np.clip(cam * 257 + ramp[None, :], 0, 65535).astype(np.uint16)
    return Image.fromarray(arr)


# -------------------------------------------------------------------------------------------- writing


def _encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    """Encode ``img`` in memory (no timestamps or other run-dependent metadata)."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def _truncated(data: bytes) -> bytes:
    """The first half of ``data``: a header that parses, pixel data that ends early."""
    return data[: len(data) // 2]


def _jpeg(img: Image.Image) -> bytes:
    return _encode(img, "JPEG", quality=_JPEG_QUALITY)


def _png(img: Image.Image) -> bytes:
    return _encode(img, "PNG", optimize=False)


def _gif(img: Image.Image) -> bytes:
    return _encode(img, "GIF")


# (relative path, kind, expected, bytes factory); the order is the order of the returned records.
_SPECS: tuple[tuple[str, str, str, Callable[[], bytes]], ...] = (
    ("people/astronaut.jpg", "face", "image", lambda: _jpeg(_photo(_skimage("astronaut")))),
    ("people/name_badge.png", "name-badge", "image", lambda: _png(_name_badge())),
    ("text/phone_number.png", "phone-number", "image", lambda: _png(_phone_number())),
    ("text/licence_plate.png", "licence-plate", "image", lambda: _png(_licence_plate())),
    # A text scan; kept at its native 384×191 so the small print stays legible.
    ("text/page.png", "document-gray", "image", lambda: _png(_photo(_skimage("page"), max_side=384))),
    ("scenes/coffee.jpg", "scene", "image", lambda: _jpeg(_photo(_skimage("coffee")))),
    ("scenes/chelsea_cat.jpg", "animal", "image", lambda: _jpeg(_photo(_skimage("chelsea")))),
    ("scenes/china.jpg", "scene", "image", lambda: _jpeg(_photo(_sklearn("china.jpg")))),
    ("scenes/flower.jpg", "scene", "image", lambda: _jpeg(_photo(_sklearn("flower.jpg")))),
    ("scenes/camera_gray.png", "grayscale", "image", lambda: _png(_photo(_skimage("camera")))),
    ("formats/cmyk.jpg", "cmyk", "image", lambda: _jpeg(_photo(_sklearn("flower.jpg")).convert("CMYK"))),
    ("formats/rgba_transparent.png", "rgba", "image", lambda: _png(_rgba_png())),
    ("formats/palette_transparent.png", "palette", "image", lambda: _png(_palette(64, transparent_index=0))),
    ("formats/palette.gif", "palette", "image", lambda: _gif(_palette(32))),
    ("formats/gray16.png", "gray16", "image", lambda: _png(_gray16())),
    ("formats/exif_rotated.jpg", "exif-rotated", "image", _exif_rotated_jpeg),
    ("broken/empty.jpg", "empty", "error", lambda: b""),
    ("broken/truncated.jpg", "truncated", "error", lambda: _truncated(_jpeg(_photo(_skimage("coffee"))))),
    (
        "broken/not_an_image.png",
        "not-an-image",
        "error",
        lambda: b"This is a plain text file that merely carries a .png name.\n",
    ),
)


def write_sample_dataset(out_dir: str | Path) -> list[SampleImage]:
    """Write the sample images under ``out_dir`` and return one record per file, in a fixed order.

    Idempotent: the subfolders in :data:`SUBFOLDERS` are removed and rewritten; anything else in
    ``out_dir`` is left alone. Deterministic, offline, and fast (well under 3 s).
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    for sub in SUBFOLDERS:
        if (root / sub).is_dir() and not (root / sub).is_symlink():
            shutil.rmtree(root / sub)
        elif (root / sub).exists() or (root / sub).is_symlink():
            (root / sub).unlink()
    samples = []
    for rel, kind, expected, make in _SPECS:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(make())
        samples.append(SampleImage(path=path, kind=kind, expected=expected))
    return samples


def _header(path: Path) -> str:
    """Format, mode and size from the file header (no pixel decoding), or "unreadable"."""
    try:
        with Image.open(path) as img:
            return f"{img.format} {img.mode} {img.width}x{img.height}"
    except Exception:
        return "unreadable"


def describe_samples(samples: Sequence[SampleImage]) -> str:
    """A short fixed-width table of ``samples``: path (relative to their common folder), kind, expected,
    size in bytes and header."""
    if not samples:
        return "(no samples)"
    paths = [s.path for s in samples]
    base = Path(os.path.commonpath([p.parent for p in paths]))
    rows = [("path", "kind", "expected", "bytes", "header")]
    for s in samples:
        size = s.path.stat().st_size if s.path.exists() else 0
        rows.append((s.path.relative_to(base).as_posix(), s.kind, s.expected, str(size), _header(s.path)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def fmt(row: tuple[str, ...]) -> str:
        pairs = enumerate(zip(row, widths, strict=True))
        return "  ".join(c.rjust(w) if i == 3 else c.ljust(w) for i, (c, w) in pairs).rstrip()

    lines = [fmt(r) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m u2s.demo_data OUT_DIR``: write the samples and print their table."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m u2s.demo_data OUT_DIR", file=sys.stderr)
        return 2
    print(describe_samples(write_sample_dataset(args[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

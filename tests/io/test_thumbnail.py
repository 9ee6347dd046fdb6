"""A JPEG decoded at a reduced DCT scale gives the pixels of a full decode resized: the VLM thumbnail
(decode stage) and the editor's working copy (stage 2), upright, at exactly the size asked for."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from u2s.config import DecodeConfig
from u2s.io.decode import DecodeError, decode_image, fit, load_rgb, thumbnail_size
from u2s.io.decode_stage import DecodeStage
from u2s.schema import new_row
from u2s.testing.leak_corpus import photo
from u2s.testing.rows import run_stage

SIDE = 448
ORIENTATION = 0x0112
#: Largest mean absolute difference per channel, in grey levels, from a full decode resized alike.
TOLERANCE = 2.5


def photo_jpeg(size: tuple[int, int], orientation: int = 1) -> bytes:
    """A real photograph resized to ``size`` (as stored), with mild sensor-like noise, JPEG q90."""
    img = photo("astronaut").resize(size, Image.Resampling.BICUBIC)
    noise = np.random.default_rng(0).normal(0, 4, (size[1], size[0], 1))
    img = Image.fromarray(np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8))
    exif = Image.Exif()
    if orientation != 1:
        exif[ORIENTATION] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, exif=exif)
    return buf.getvalue()


def channel_diff(a: Image.Image, b: Image.Image) -> np.ndarray:
    assert a.size == b.size and a.mode == b.mode == "RGB"
    return np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean(axis=(0, 1))


@pytest.mark.parametrize(
    ("size", "orientation"),
    [((1601, 1203), 1), ((2001, 1333), 6), ((3000, 377), 1), ((1203, 1601), 8), ((2400, 1800), 3)],
    ids=["odd-1/2", "rotated-1/4", "panorama-1/8", "portrait-rotated", "upside-down"],
)
def test_thumbnail_decode_matches_a_full_decode_resized(size: tuple[int, int], orientation: int) -> None:
    data = photo_jpeg(size, orientation)
    full = load_rgb(data)
    reference = full.resize(fit(*full.size, SIDE), Image.Resampling.BICUBIC)

    decoded = decode_image(data, size=thumbnail_size(SIDE))

    assert decoded.size == full.size  # the file's upright size, though decoded smaller
    assert decoded.reduced and decoded.image.size == reference.size
    assert decoded.image.mode == "RGB" and decoded.image.info == {}
    diff = channel_diff(decoded.image, reference)
    assert (diff <= TOLERANCE).all(), diff
    assert diff.max() > 0  # the pixels came from the DCT-scaled decode, not from a full one


def test_decode_stage_thumbnail_and_size_match_a_full_decode() -> None:
    data = photo_jpeg((2001, 1333), orientation=6)
    full = load_rgb(data)
    reference = full.resize(fit(*full.size, SIDE), Image.Resampling.BICUBIC)

    (row,) = run_stage(DecodeStage(DecodeConfig(), thumbnail_side=SIDE), [new_row("a", "a.jpg", None, data)])

    assert row["status"] is None and (row["width"], row["height"]) == full.size == (1333, 2001)
    thumb = Image.open(io.BytesIO(row["thumbnail"]))
    assert thumb.size == reference.size
    assert (channel_diff(thumb.convert("RGB"), reference) <= TOLERANCE + 1).all()  # + the q95 encode
    published = load_rgb(row["image"]["bytes"])
    assert np.array_equal(np.asarray(published), np.asarray(full))  # metadata gone, every pixel kept


def test_truncated_jpeg_still_fails_at_a_reduced_scale() -> None:
    data = photo_jpeg((1601, 1203))
    with pytest.raises(DecodeError, match="truncated"):
        decode_image(data[: len(data) * 2 // 3], size=thumbnail_size(SIDE))
    (row,) = run_stage(
        DecodeStage(DecodeConfig(), thumbnail_side=SIDE), [new_row("a", "a.jpg", None, data[:-4096])]
    )
    assert row["status"] == "error" and row["error"].startswith("decode: corrupt or truncated")


def test_working_size_decode_matches_a_full_decode_resized() -> None:
    """Stage 2: the editor's size (here an aspect-ratio bucket, not the image's aspect), Lanczos."""
    data = photo_jpeg((2001, 1333), orientation=6)
    full = load_rgb(data)
    lanczos = Image.Resampling.LANCZOS

    def bucket(width: int, height: int) -> tuple[int, int]:
        return (384, 512) if height > width else (512, 384)

    work = load_rgb(data, size=bucket, resample=lanczos)

    assert work.size == (384, 512)
    diff = channel_diff(work, full.resize((384, 512), lanczos))
    assert (diff <= TOLERANCE).all() and diff.max() > 0, diff


def test_no_reduction_where_none_shrinks_or_the_format_cannot() -> None:
    data = photo_jpeg((640, 480))
    full = np.asarray(load_rgb(data))
    for sizer in (thumbnail_size(1000), lambda w, h: (w * 2, h * 2), lambda w, h: (w // 2, h * 2)):
        decoded = decode_image(data, size=sizer)
        assert not decoded.reduced and np.array_equal(np.asarray(decoded.image), full)
    png = io.BytesIO()
    Image.fromarray(full).save(png, "PNG")
    decoded = decode_image(png.getvalue(), size=thumbnail_size(64))
    assert not decoded.reduced and np.array_equal(np.asarray(decoded.image), full)

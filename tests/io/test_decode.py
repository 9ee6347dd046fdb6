"""load_rgb and DecodeStage on real encoded files of every awkward kind (built in memory with Pillow)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from u2s.config import DecodeConfig
from u2s.io.decode import DecodeError, load_rgb
from u2s.io.decode_stage import DecodeStage
from u2s.schema import new_row
from u2s.testing.rows import run_stage

EXIF_ORIENTATION = 0x0112


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noise_jpeg(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return encode(
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)), "JPEG", quality=90
    )


def check_rgb(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    assert img.mode == "RGB" and img.size == size
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and arr.shape == (size[1], size[0], 3)
    return arr


def png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width``x``height`` but whose pixel data is a 1x1 image's."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = 8  # after the signature: length(4) type(4) data(13) crc(4)
    body = struct.pack(">II", width, height) + bytes(data[ihdr + 16 : ihdr + 21])
    data[ihdr + 8 : ihdr + 21] = body
    data[ihdr + 21 : ihdr + 25] = struct.pack(">I", zlib.crc32(b"IHDR" + body))
    return bytes(data)


# ------------------------------------------------------------------------------------------ failures


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"name,phone\nAlice,555-0100\n" * 20, "not an image"),
        (
            b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n",
            "not an image",
        ),  # no Ghostscript
    ],
    ids=["zero-byte", "text", "eps-refused"],
)
def test_non_images_fail_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        load_rgb(data)


def test_truncated_jpeg_fails() -> None:
    data = noise_jpeg(128, 96)
    load_rgb(data)  # the whole file is fine
    with pytest.raises(DecodeError, match="truncated"):
        load_rgb(data[: len(data) // 2])


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_limit_is_checked_from_the_header_before_decoding() -> None:
    data = png_with_size(
        10_000, 10_000
    )  # 100 MP claimed, pixel data missing: decoding would fail differently
    with pytest.raises(DecodeError, match=r"too large: 10000x10000 exceeds the 1000000-pixel limit"):
        load_rgb(data, max_pixels=1_000_000)
    with pytest.raises(DecodeError, match="pixel limit"):  # Pillow's own bomb guard also becomes a reason
        load_rgb(png_with_size(30_000, 30_000))


def test_pixel_limit_boundary() -> None:
    data = encode(Image.new("RGB", (40, 25)), "PNG")
    assert load_rgb(data, max_pixels=1000).size == (40, 25)
    with pytest.raises(DecodeError, match="too large"):
        load_rgb(data, max_pixels=999)


# ------------------------------------------------------------------------------------- colour modes


def test_cmyk_jpeg_with_adobe_inversion_decodes_to_the_right_colours() -> None:
    img = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # pure red in CMYK
    img.paste((255, 0, 255, 0), (16, 0, 32, 32))  # pure green on the right half
    data = encode(img, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).info.get("adobe") is not None  # Adobe APP14 marker: inverted storage
    arr = check_rgb(load_rgb(data), (32, 32)).astype(int)
    assert np.abs(arr[16, 4] - [255, 0, 0]).max() < 12
    assert np.abs(arr[16, 28] - [0, 255, 0]).max() < 12


def test_rgba_png_shows_what_convert_rgb_shows_with_hidden_colour_zeroed() -> None:
    arr = np.zeros((8, 12, 4), dtype=np.uint8)
    arr[:, :4] = (255, 0, 0, 0)  # fully transparent red: hidden colour → black
    arr[:, 4:8] = (0, 0, 255, 255)  # opaque blue
    arr[:, 8:] = (10, 200, 30, 1)  # almost transparent green: a loader shows it, so the VLM does too
    out = check_rgb(load_rgb(encode(Image.fromarray(arr), "PNG")), (12, 8))
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[0, 5].tolist() == [0, 0, 255]
    assert out[0, 9].tolist() == [10, 200, 30]


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency(fmt: str) -> None:
    img = Image.new("P", (10, 10), 0)
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 200, 0] + [0] * (256 * 3 - 9))
    img.paste(1, (0, 0, 5, 10))  # left: red
    img.paste(2, (5, 0, 10, 10))  # right: index 2, transparent
    out = check_rgb(load_rgb(encode(img, fmt, transparency=2)), (10, 10))
    assert out[5, 2].tolist() == [255, 0, 0]
    assert out[5, 7].tolist() == [0, 0, 0]  # not the palette's green: transparent pixels carry no colour


def test_la_hidden_grey_is_zeroed() -> None:
    arr = np.zeros((4, 6, 2), dtype=np.uint8)
    arr[:, :3] = (180, 0)  # hidden grey
    arr[:, 3:] = (90, 255)
    out = check_rgb(load_rgb(encode(Image.fromarray(arr), "PNG")), (6, 4))
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 4].tolist() == [90, 90, 90]


def test_decoded_images_carry_no_info() -> None:
    """Encoders read ``info`` (JPEG's comment, PNG's ICC): nothing of the input may ride along."""
    exif = Image.Exif()
    exif[0x013B] = "Artist Name"
    jpeg = encode(
        Image.new("RGB", (8, 8), (1, 2, 3)), "JPEG", comment=b"a private comment", exif=exif.tobytes()
    )
    assert Image.open(io.BytesIO(jpeg)).info["comment"]
    img = load_rgb(jpeg)
    assert img.info == {}
    assert b"a private comment" not in encode(img, "JPEG") and b"Artist" not in encode(img, "JPEG")


def test_palette_without_transparency() -> None:
    img = Image.new("P", (6, 6), 1)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * (256 * 3 - 6))
    assert check_rgb(load_rgb(encode(img, "GIF")), (6, 6))[3, 3].tolist() == [10, 200, 30]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_grayscale(fmt: str) -> None:
    gray = np.tile(np.linspace(0, 255, 16, dtype=np.uint8), (16, 1))
    out = check_rgb(load_rgb(encode(Image.fromarray(gray, "L"), fmt)), (16, 16)).astype(int)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert np.abs(out[..., 0] - gray).max() <= (0 if fmt == "PNG" else 8)


def test_16bit_png_is_rescaled_not_clipped() -> None:
    values = np.array([[0, 1000, 30000, 65535]], dtype=np.uint16).repeat(4, axis=0)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    out = check_rgb(load_rgb(data), (4, 4))
    assert out[0, :, 0].tolist() == [0, 4, 117, 255]  # v / 65535 * 255, not min(v, 255)
    dark = np.full((4, 4), 200, dtype=np.uint16)  # a dark 16-bit image stays dark
    assert check_rgb(load_rgb(encode(Image.fromarray(dark), "PNG")), (4, 4)).max() <= 1


def test_float_tiff_in_unit_range() -> None:
    arr = np.array([[0.0, 0.5, 1.0]], dtype=np.float32).repeat(2, axis=0)
    out = check_rgb(load_rgb(encode(Image.fromarray(arr, "F"), "TIFF")), (3, 2))
    assert out[0, :, 0].tolist() == [0, 128, 255]


def test_bilevel_and_la() -> None:
    assert load_rgb(encode(Image.new("1", (5, 5), 1), "PNG")).getpixel((2, 2)) == (255, 255, 255)
    la = Image.new("LA", (5, 5), (0, 255))
    assert load_rgb(encode(la, "PNG")).getpixel((2, 2)) == (0, 0, 0)


def test_exif_orientation_6_is_applied() -> None:
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 8, 8))  # marker at the stored top-left
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # "rotate 90° clockwise to display"
    out = check_rgb(load_rgb(encode(stored, "JPEG", quality=95, exif=exif.tobytes())), (20, 40)).astype(int)
    assert np.abs(out[3, 16] - [255, 0, 0]).max() < 40  # the marker is now at the top-right
    assert np.abs(out[3, 3] - [0, 0, 255]).max() < 40
    assert np.abs(out[36, 3] - [0, 0, 255]).max() < 40


# An EXIF block with orientation 6 and a broken tag type elsewhere: PIL's exif_transpose raises on it
# (struct.error while rewriting the block), yet the orientation itself is readable.
BROKEN_EXIF = (
    b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x02\x01S\x00\x02\x00\x00\x00\x04cam\x00"
    b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00\x00\x00\x00\x00"
)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_malformed_exif_still_applies_the_orientation() -> None:
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 8, 8))
    out = check_rgb(load_rgb(encode(stored, "JPEG", quality=95, exif=BROKEN_EXIF)), (20, 40)).astype(int)
    assert np.abs(out[3, 16] - [255, 0, 0]).max() < 40


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_unreadable_exif_keeps_the_image_as_stored() -> None:
    data = encode(Image.new("RGB", (9, 7), (1, 2, 3)), "JPEG", exif=b"Exif\x00\x00MM\x00*garbage")
    check_rgb(load_rgb(data), (9, 7))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation(orientation: int) -> None:
    """The stored marker (top-left) lands where the EXIF orientation says the display's top-left is."""
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    out = load_rgb(encode(stored, "PNG", exif=exif.tobytes()))
    w, h = out.size
    assert (w, h) == ((20, 40) if orientation >= 5 else (40, 20))
    # where the stored top-left corner is displayed, per the EXIF spec
    corner = {1: (0, 0), 2: (w - 1, 0), 3: (w - 1, h - 1), 4: (0, h - 1),
              5: (0, 0), 6: (w - 1, 0), 7: (w - 1, h - 1), 8: (0, h - 1)}[orientation]  # fmt: skip
    assert out.getpixel(corner) == (255, 0, 0)
    assert sum(px == (255, 0, 0) for px in out.getdata()) == 64


@pytest.mark.parametrize("fmt", ["WEBP", "BMP", "TIFF", "GIF"])
def test_other_formats(fmt: str) -> None:
    check_rgb(load_rgb(encode(Image.new("RGB", (7, 5), (10, 20, 30)), fmt)), (7, 5))


# -------------------------------------------------------------------------------------- DecodeStage


def _rows(*payloads: bytes | None) -> list[dict]:
    return [new_row(f"id{i}", f"/data/{i}.jpg", None, data) for i, data in enumerate(payloads)]


def _decode(rows: list[dict], config: DecodeConfig | None = None, side: int = 8) -> list[dict]:
    return run_stage(DecodeStage(config or DecodeConfig(), thumbnail_side=side, metadata="keep"), rows)


def test_decode_stage_sets_size_thumbnail_and_keeps_bytes() -> None:
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    rotated = encode(stored, "JPEG", exif=exif.tobytes())
    cmyk = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG")
    jpeg = noise_jpeg(130, 10)
    truncated = jpeg[: len(jpeg) // 2]
    rows = _rows(jpeg, rotated, cmyk, truncated, b"", None)
    out = _decode(rows)

    assert [(r["width"], r["height"]) for r in out[:3]] == [(130, 10), (20, 40), (16, 16)]
    for before, after in zip(rows, out, strict=True):  # never re-encoded, whatever happened
        assert after["image"]["bytes"] == before["image"]["bytes"]
    assert [r["image"]["path"] for r in out[:3]] == ["id0.jpg", "id1.jpg", "id2.jpg"]  # never the source
    # The VLM's thumbnail, made once from the upright image: long side 8, aspect kept.
    assert [Image.open(io.BytesIO(r["thumbnail"])).size for r in out[:3]] == [(8, 1), (4, 8), (8, 8)]
    assert all(r["thumbnail"] is None for r in out[3:])
    assert [r["status"] for r in out[:3]] == [None, None, None]  # still in flight for the next stages
    assert out[3]["status"] == "error" and out[3]["error"].startswith("decode: corrupt or truncated")
    assert out[4]["error"] == "decode: empty file"
    assert out[5]["error"] == "decode: no image bytes"
    assert all(r["width"] is None for r in out[3:])
    assert all(r["timings"]["decode"] is not None for r in out)


def test_decode_stage_limits() -> None:
    big = noise_jpeg(64, 64)
    small = encode(Image.new("RGB", (64, 64)), "PNG")
    huge = png_with_size(65, 64)
    out = _decode(_rows(big, small, huge), DecodeConfig(max_bytes=len(big) - 1, max_pixels=64 * 64))
    assert (
        out[0]["error"] == f"decode: file too large: {len(big)} bytes exceeds the {len(big) - 1}-byte limit"
    )
    assert out[1]["error"] is None and out[1]["width"] == 64
    assert out[2]["error"] == "decode: image too large: 65x64 exceeds the 4096-pixel limit"


def test_decode_stage_skips_rows_already_failed() -> None:
    rows = _rows(b"", noise_jpeg(8, 8))
    rows[0].update(status="error", error="read: FileNotFoundError")
    out = _decode(rows)
    assert out[0]["error"] == "read: FileNotFoundError"  # not overwritten by "decode: empty file"
    assert out[0]["timings"]["decode"] is None
    assert (out[1]["width"], out[1]["height"]) == (8, 8)


# -------------------------------------------------------------------------------------------- frames


def _animation() -> bytes:
    """An APNG: a red default image outside the animation, then a green and a blue frame."""
    red, green, blue = (Image.new("RGB", (12, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255)))
    return encode(red, "PNG", save_all=True, default_image=True, append_images=[green, blue])


def _colour(thumbnail: bytes) -> list[int]:
    return np.asarray(Image.open(io.BytesIO(thumbnail)).convert("RGB"))[4, 4].tolist()


@pytest.mark.parametrize("metadata", ["strip", "keep"])
def test_decode_stage_publishes_the_inspected_frame_only(metadata: str) -> None:
    stage = DecodeStage(DecodeConfig(), thumbnail_side=8, metadata=metadata)
    (row,) = run_stage(stage, _rows(_animation()))
    assert row["frames"] == 3 and row["frame_thumbnails"] is None
    assert np.abs(np.array(_colour(row["thumbnail"])) - [255, 0, 0]).max() < 8  # the default image
    published = Image.open(io.BytesIO(row["image"]["bytes"]))
    assert row["image"]["path"] == "id0.png" and getattr(published, "n_frames", 1) == 1
    assert np.asarray(published.convert("RGB"))[4, 4].tolist() == [255, 0, 0]
    assert row["metadata_removed"] is True


def test_decode_stage_with_all_frames_thumbnails_every_frame_and_keeps_the_animation() -> None:
    stage = DecodeStage(DecodeConfig(frames="all"), thumbnail_side=8, metadata="strip")
    still = noise_jpeg(8, 8)
    animated, plain = run_stage(stage, _rows(_animation(), still))
    assert animated["frames"] == 3 and len(animated["frame_thumbnails"]) == 2
    colours = [_colour(t) for t in (animated["thumbnail"], *animated["frame_thumbnails"])]
    for got, want in zip(colours, ([255, 0, 0], [0, 255, 0], [0, 0, 255]), strict=True):
        assert np.abs(np.array(got) - want).max() < 8
    assert Image.open(io.BytesIO(animated["image"]["bytes"])).n_frames == 3  # every frame was inspected
    assert plain["frames"] == 1 and plain["frame_thumbnails"] is None


def test_decode_stage_fails_files_with_more_frames_than_it_may_inspect() -> None:
    stage = DecodeStage(DecodeConfig(frames="all", max_frames=2), thumbnail_side=8)
    (row,) = run_stage(stage, _rows(_animation()))
    assert row["status"] == "error" and row["error"] == "decode: too many frames: 3 exceeds the 2-frame limit"
    assert row["thumbnail"] is None and row["frame_thumbnails"] is None
    # frames: first publishes frame 0 alone, however many there are
    (first,) = run_stage(DecodeStage(DecodeConfig(max_frames=2), thumbnail_side=8), _rows(_animation()))
    assert first["status"] is None and first["frames"] == 3

"""strip_metadata on real files carrying every kind of metadata (built with Pillow and the corpus builders).

Each test checks the three promises: the decoded pixels (``load_rgb``) are identical, the orientation
survives, and none of the planted strings or bytes are left; JPEGs also keep their tables and
entropy-coded data byte for byte (no re-encode).
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageCms, ImageOps

from u2s.io.decode import DecodeError, decode_image, later_frames, load_rgb, thumbnail_size
from u2s.io.metadata import Stripped, publishable, sanitize_icc, strip_metadata
from u2s.testing.leak_corpus import (
    ARTIST,
    CAMERA_SERIAL,
    DATETIME_ORIGINAL,
    GPS_LATITUDE,
    GPS_LONGITUDE,
    ICC_COPYRIGHT_PERSON,
    ICC_DESC_PERSON,
    ICC_DEVICE_PERSON,
    ICC_PNG_NAME,
    IPTC_BYLINE,
    IPTC_CAPTION,
    XMP_APP1,
    XMP_PERSON,
    build_leak_corpus,
    encode,
    exif_block,
    extended_xmp_segment,
    gps_rational_bytes,
    hidden_under_alpha,
    icc_profile,
    insert_jpeg_segments,
    iptc_segment,
    jpeg_segment,
    photo,
    png_chunk,
    png_with_chunks,
    png_with_icc_name,
    xmp_packet,
)

ORIENTATION = ExifTags.Base.Orientation
SECRETS = {
    "artist": ARTIST.encode(),
    "artist utf-16": ARTIST.encode("utf-16-le"),
    "serial": CAMERA_SERIAL.encode(),
    "time": DATETIME_ORIGINAL.encode(),
    "xmp person": XMP_PERSON.encode(),
    "iptc by-line": IPTC_BYLINE.encode(),
    "iptc caption": IPTC_CAPTION.encode(),
    "comment": b"Bedroom of Niamh Oduya-Carlsen",
    "ducky": b"Ducky quality note by Lior Estrada-Boateng",
    "app3": b"APP3 Meta by Kwame Lindahl",
    "app15": b"APP15 private Yusuf Arkwright",
    "flashpix": b"FPXR stream of Odile Ferreira-Quist",
    "jfif thumbnail": b"JFIFthumbnailSECRETbytes" * 2,
    "jfxx thumbnail": b"JFXXthumbnailSECRET",
    "png text": b"Author of this PNG: Saoirse Delacroix-Mbeki",
    "private chunk": b"private chunk of Anouk Petrov-Hale",
    "trailer": b"trailing bytes of Tomasz Ilunga-Weiss",
}
SMALL = (96, 64)


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(load_rgb(data))


def leaked(data: bytes, extra: tuple[bytes, ...] = ()) -> list[bytes]:
    gps = (gps_rational_bytes(GPS_LATITUDE, exif_block()), gps_rational_bytes(GPS_LONGITUDE, exif_block()))
    return [s for s in (*SECRETS.values(), *gps, *extra) if s in data]


def tables_and_scans(jpeg: bytes) -> bytes:
    """A Pillow JPEG (no thumbnail inside) from its first DQT to EOI: the bytes that define the pixels."""
    return jpeg[jpeg.index(b"\xff\xdb") :]


def small(name: str = "astronaut", size: tuple[int, int] = SMALL) -> Image.Image:
    return photo(name).resize(size)


def srgb_icc() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def check_icc(published: bytes | None, original: bytes) -> None:
    """``published`` renders colours exactly as ``original`` does and names nobody, no date, no device."""
    assert published is not None

    def to_lab(icc: bytes) -> np.ndarray:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        transform = ImageCms.buildTransform(profile, ImageCms.createProfile("LAB"), "RGB", "LAB")
        return np.asarray(ImageCms.applyTransform(small(), transform))

    np.testing.assert_array_equal(to_lab(published), to_lab(original))
    profile = ImageCms.ImageCmsProfile(io.BytesIO(published))
    assert ImageCms.getProfileDescription(profile).strip() == "ICC profile"
    assert ImageCms.getProfileCopyright(profile).strip() == "No copyright information"
    assert published[24:36] == bytes(12) and published[48:56] == bytes(8)  # no date, maker or model
    for planted in (ICC_DESC_PERSON, ICC_COPYRIGHT_PERSON, ICC_DEVICE_PERSON, "sRGB built-in"):
        assert planted.encode("utf-16-be") not in published and planted.encode() not in published


def check_upright_exif_only(out: Image.Image, orientation: int) -> None:
    """``out``'s EXIF is the Orientation tag alone (or absent when it is 1), with no sub-IFD."""
    exif = out.getexif()
    assert dict(exif) == ({} if orientation == 1 else {ORIENTATION: orientation})
    for ifd in (ExifTags.IFD.Exif, ExifTags.IFD.GPSInfo, ExifTags.IFD.IFD1):
        assert exif.get_ifd(ifd) == {}


# --------------------------------------------------------------------------------------------- JPEG


def dirty_jpeg(img: Image.Image, thumbnail: bytes, **save) -> tuple[bytes, bytes]:
    """(A JPEG with every kind of metadata segment, the clean Pillow JPEG it was built from)."""
    clean = encode(img, "JPEG", quality=90, icc_profile=srgb_icc(), **save)
    with_exif = encode(
        img,
        "JPEG",
        quality=90,
        icc_profile=srgb_icc(),
        exif=exif_block(orientation=6, thumbnail=thumbnail),
        comment=SECRETS["comment"],
        **save,
    )
    jfif_end = 4 + struct.unpack_from(">H", with_exif, 4)[0]
    jfif_thumbnail = jpeg_segment(
        0xE0, b"JFIF\x00\x01\x02\x00\x00\x01\x00\x01\x04\x01" + SECRETS["jfif thumbnail"]
    )
    segments = [
        jpeg_segment(0xE0, b"JFXX\x00\x10" + SECRETS["jfxx thumbnail"]),
        jpeg_segment(0xE1, XMP_APP1 + xmp_packet(XMP_PERSON, gps=True)),
        extended_xmp_segment(f"<rdf:li>{XMP_PERSON}</rdf:li>"),
        jpeg_segment(0xE2, b"FPXR\x00" + SECRETS["flashpix"]),
        jpeg_segment(0xE3, SECRETS["app3"]),
        jpeg_segment(0xEC, b"Ducky\x00" + SECRETS["ducky"]),
        iptc_segment(),
        jpeg_segment(0xEF, SECRETS["app15"]),
    ]
    dirty = (
        b"\xff\xd8" + jfif_thumbnail + insert_jpeg_segments(b"\xff\xd8" + with_exif[jfif_end:], segments)[2:]
    )
    assert dirty.endswith(tables_and_scans(clean))  # the metadata is all in front
    return dirty, clean


@pytest.mark.parametrize("reduced", [False, True], ids=["full-decode", "thumbnail-decode"])
@pytest.mark.parametrize("save", [{}, {"progressive": True}, {"restart_marker_rows": 1}], ids=str)
def test_jpeg_drops_every_metadata_segment_and_keeps_the_scans_byte_for_byte(save, reduced):
    """The marker walk needs no pixels: given the decode stage's DCT-scaled thumbnail decode
    (``reduced``), the published file is the same, its pixels those of the input in full."""
    img = small()
    thumbnail = encode(img.resize((24, 16)), "JPEG", quality=70)
    dirty, clean = dirty_jpeg(img, thumbnail, **save)
    before = Image.open(io.BytesIO(dirty))
    assert {"exif", "xmp", "comment", "photoshop", "icc_profile"} <= set(before.info)
    assert before.getexif().get_ifd(ExifTags.IFD.GPSInfo)
    inspected = decode_image(dirty, size=thumbnail_size(16)) if reduced else None
    assert inspected is None or (inspected.reduced and inspected.size == (SMALL[1], SMALL[0]))

    out = strip_metadata(dirty, decoded=inspected)

    assert (out.extension, out.removed) == ("jpg", True)
    assert out.data.endswith(tables_and_scans(clean))  # tables and entropy-coded data untouched
    np.testing.assert_array_equal(decoded(out.data), decoded(dirty))
    assert leaked(out.data, (thumbnail[thumbnail.index(b"\xff\xda") :],)) == []
    after = Image.open(io.BytesIO(out.data))
    assert after.format == "JPEG"
    assert not {"xmp", "comment", "photoshop", "flashpix", "mp", "mpoffset"} & set(after.info)
    check_icc(after.info["icc_profile"], srgb_icc())  # colour rendering kept
    assert after.info["jfif_density"] == (1, 1)
    check_upright_exif_only(after, 6)
    assert ImageOps.exif_transpose(after).size == load_rgb(dirty).size == (SMALL[1], SMALL[0])


def test_jpeg_metadata_between_scans_is_dropped():
    clean = encode(small(), "JPEG", quality=85, progressive=True)
    second_scan = clean.index(b"\xff\xda", clean.index(b"\xff\xda") + 2)
    dirty = clean[:second_scan] + jpeg_segment(0xFE, SECRETS["comment"]) + clean[second_scan:]
    out = strip_metadata(dirty)
    assert out.data == clean and out.removed
    np.testing.assert_array_equal(decoded(out.data), decoded(dirty))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_orientation_survives_alone(orientation):
    dirty = encode(small(), "JPEG", exif=exif_block(orientation=orientation))
    out = strip_metadata(dirty)
    np.testing.assert_array_equal(decoded(out.data), decoded(dirty))
    check_upright_exif_only(Image.open(io.BytesIO(out.data)), orientation)
    assert leaked(out.data) == []


def test_jpeg_orientation_from_xmp_becomes_an_exif_orientation():
    img = small()
    dirty = insert_jpeg_segments(
        encode(img, "JPEG"), [jpeg_segment(0xE1, XMP_APP1 + xmp_packet(orientation=8))]
    )
    out = strip_metadata(dirty)
    after = Image.open(io.BytesIO(out.data))
    assert "xmp" not in after.info
    check_upright_exif_only(after, 8)
    np.testing.assert_array_equal(decoded(out.data), decoded(dirty))
    assert load_rgb(out.data).size == (img.height, img.width)


def test_clean_jpeg_is_returned_unchanged():
    clean = encode(small(), "JPEG", quality=80)
    assert strip_metadata(clean) == Stripped(clean, "jpg", False)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_unreadable_exif_is_dropped_like_load_rgb_ignores_it():
    """A broken EXIF block: load_rgb leaves the image as stored, and so does the stripped file."""
    broken = jpeg_segment(0xE1, b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff" + SECRETS["serial"])
    dirty = insert_jpeg_segments(encode(small(), "JPEG"), [broken])
    out = strip_metadata(dirty)
    assert "exif" not in Image.open(io.BytesIO(out.data)).info and leaked(out.data) == []
    np.testing.assert_array_equal(decoded(out.data), decoded(dirty))


def test_cmyk_jpeg_keeps_its_adobe_segment():
    cmyk = encode(small().convert("CMYK"), "JPEG", quality=90, exif=exif_block())
    assert Image.open(io.BytesIO(cmyk)).info["adobe"]
    out = strip_metadata(cmyk)
    after = Image.open(io.BytesIO(out.data))
    assert after.mode == "CMYK" and "adobe" in after.info
    assert out.data.endswith(tables_and_scans(cmyk))
    np.testing.assert_array_equal(decoded(out.data), decoded(cmyk))
    assert leaked(out.data) == []


def test_mpo_extra_images_after_eoi_are_dropped():
    first, second = small(), small("coffee")
    mpo = encode(first, "MPO", save_all=True, append_images=[second], exif=exif_block())
    assert Image.open(io.BytesIO(mpo)).n_frames == 2
    second_scan = tables_and_scans(encode(second, "JPEG"))[-200:]
    assert second_scan in mpo

    out = strip_metadata(mpo)

    after = Image.open(io.BytesIO(out.data))
    assert after.format == "JPEG" and "mp" not in after.info and getattr(after, "n_frames", 1) == 1
    assert second_scan not in out.data and out.data.endswith(b"\xff\xd9")
    np.testing.assert_array_equal(decoded(out.data), decoded(mpo))
    assert leaked(out.data) == []


@pytest.mark.parametrize("reduced", [False, True], ids=["full-decode", "thumbnail-decode"])
def test_malformed_jpeg_is_re_encoded_not_leaked(reduced):
    """Garbage between segments (libjpeg skips it): not parsed with certainty, so re-encoded as PNG; of
    every pixel, also when the decode stage decoded it at its thumbnail's size (``reduced``)."""
    clean = encode(small(), "JPEG", quality=90, exif=exif_block(orientation=3))
    dqt = clean.index(b"\xff\xdb")
    dirty = clean[:dqt] + b"\x00\x13\x37" + clean[dqt:]
    np.asarray(load_rgb(dirty))  # still decodable
    inspected = decode_image(dirty, size=thumbnail_size(16)) if reduced else None
    assert inspected is None or inspected.image.size == (16, 11)

    out = strip_metadata(dirty, decoded=inspected)

    assert (out.extension, out.removed) == ("png", True)
    np.testing.assert_array_equal(decoded(out.data), decoded(dirty))
    after = Image.open(io.BytesIO(out.data))
    assert after.format == "PNG" and dict(after.getexif()) == {} and after.info == {}
    assert leaked(out.data) == []


def test_truncated_jpeg_raises():
    clean = encode(small(), "JPEG", exif=exif_block())
    with pytest.raises(DecodeError):
        strip_metadata(clean[: len(clean) // 2])


# ---------------------------------------------------------------------------------------------- PNG


def idat_run(png: bytes) -> bytes:
    """The IDAT chunks of a Pillow PNG (contiguous), as bytes."""
    return png[png.index(b"IDAT") - 4 : png.rindex(b"IEND") - 4]


def raw_profile_exif(exif: bytes) -> bytes:
    """An ImageMagick-style ``Raw profile type exif`` text: hex of the EXIF block after a small header."""
    hexed = exif.hex()
    return f"\nexif\n{len(exif):8d}\n{hexed}\n".encode()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P"])
def test_png_keeps_rendering_chunks_and_drops_text(mode):
    img = small().convert(mode) if mode != "RGBA" else small().convert("RGBA")
    if mode == "RGBA":  # never fully transparent: nothing hidden, so the pixel data is copied
        img.putalpha(Image.linear_gradient("L").resize(img.size).point(lambda v: max(v, 1)))
    save = {"icc_profile": srgb_icc()} if mode != "P" else {"transparency": 3}
    clean = encode(img, "PNG", **save)
    text = png_chunk(b"tEXt", b"Author\x00" + SECRETS["png text"])
    dirty = (
        png_with_chunks(
            clean,
            [
                text,
                png_chunk(b"gAMA", struct.pack(">I", 45455)),
                png_chunk(b"iTXt", b"Description\x00\x00\x00\x00\x00" + XMP_PERSON.encode()),
                png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(IPTC_CAPTION.encode())),
                png_chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + xmp_packet(gps=True)),
                png_chunk(b"eXIf", exif_block(orientation=3, thumbnail=b"\xff\xd8thumb\xff\xd9")[6:]),
                png_chunk(b"prVt", SECRETS["private chunk"]),
            ],
            [png_chunk(b"tIME", struct.pack(">HBBBBB", 2019, 7, 14, 15, 22, 41)), text],
        )
        + SECRETS["trailer"]
    )
    before = Image.open(io.BytesIO(dirty))
    before.load()
    assert {"Author", "Description", "Comment", "exif"} <= set(before.info)

    out = strip_metadata(dirty)

    assert (out.extension, out.removed) == ("png", True)
    assert idat_run(clean) in out.data  # compressed pixel data copied, not re-encoded
    np.testing.assert_array_equal(decoded(out.data), decoded(dirty))
    assert leaked(out.data, (zlib.compress(IPTC_CAPTION.encode()),)) == []
    after = Image.open(io.BytesIO(out.data))
    after.load()
    assert not {"Author", "Description", "Comment", "XML:com.adobe.xmp", "xmp"} & set(after.info)
    assert after.info["gamma"] == pytest.approx(0.45455)
    if "icc_profile" in save:
        check_icc(after.info.get("icc_profile"), save["icc_profile"])
    assert after.info.get("transparency") == before.info.get("transparency")
    check_upright_exif_only(after, 3)


def test_png_orientation_from_a_raw_exif_profile_text_chunk():
    clean = encode(small(), "PNG")
    profile = zlib.compress(raw_profile_exif(exif_block(orientation=6)))
    dirty = png_with_chunks(clean, [png_chunk(b"zTXt", b"Raw profile type exif\x00\x00" + profile)])
    assert Image.open(io.BytesIO(dirty)).getexif()[ORIENTATION] == 6

    out = strip_metadata(dirty)

    check_upright_exif_only(Image.open(io.BytesIO(out.data)), 6)
    np.testing.assert_array_equal(decoded(out.data), decoded(dirty))
    assert leaked(out.data) == []


def test_png_exif_after_the_pixel_data_still_gives_the_orientation():
    clean = encode(small(), "PNG")
    dirty = png_with_chunks(clean, [], [png_chunk(b"eXIf", exif_block(orientation=5)[6:])])
    out = strip_metadata(dirty)
    check_upright_exif_only(Image.open(io.BytesIO(out.data)), 5)
    np.testing.assert_array_equal(decoded(out.data), decoded(dirty))
    assert out.data.index(b"eXIf") < out.data.index(b"IDAT")


def test_sixteen_bit_png_stays_sixteen_bit():
    wide = Image.fromarray((np.asarray(small().convert("L"), dtype=np.uint16) * 257 + 3).astype(np.uint16))
    assert wide.mode.startswith("I;16")
    clean = encode(wide, "PNG")
    dirty = png_with_chunks(clean, [png_chunk(b"tEXt", b"Author\x00" + SECRETS["png text"])])
    out = strip_metadata(dirty)
    after = Image.open(io.BytesIO(out.data))
    assert after.mode == Image.open(io.BytesIO(clean)).mode and "Author" not in after.info
    np.testing.assert_array_equal(np.asarray(after), np.asarray(Image.open(io.BytesIO(clean))))
    np.testing.assert_array_equal(decoded(out.data), decoded(dirty))
    assert leaked(out.data) == []


def apng_hiding_a_face() -> bytes:
    """An APNG whose default image (what Pillow decodes first) is not part of its animation: a player
    shows only the frames after it, the astronaut's face among them."""
    return encode(small("rocket"), "PNG", save_all=True, default_image=True,
                  append_images=[small(), small("brick")])  # fmt: skip


def single_frame(data: bytes) -> Image.Image:
    after = Image.open(io.BytesIO(data))
    assert getattr(after, "n_frames", 1) == 1 and not getattr(after, "is_animated", False)
    return after


def test_apng_publishes_only_the_inspected_default_image():
    dirty = png_with_chunks(apng_hiding_a_face(), [png_chunk(b"tEXt", b"Author\x00" + SECRETS["png text"])])
    assert Image.open(io.BytesIO(dirty)).n_frames == 3

    out = strip_metadata(dirty)

    assert (out.extension, out.removed) == ("png", True)
    after = single_frame(out.data)
    assert not {b"acTL", b"fcTL", b"fdAT"} & {out.data[i : i + 4] for i in range(len(out.data) - 3)}
    np.testing.assert_array_equal(np.asarray(after.convert("RGB")), np.asarray(small("rocket")))
    np.testing.assert_array_equal(decoded(out.data), decoded(dirty))
    assert leaked(out.data) == []


def test_apng_whose_frames_were_all_inspected_keeps_its_animation():
    data = apng_hiding_a_face()
    dirty = png_with_chunks(data, [png_chunk(b"tEXt", b"Author\x00" + SECRETS["png text"])])
    decoded_all = decode_image(dirty)
    for _ in later_frames(dirty, decoded_all.frames):
        pass
    decoded_all.all_frames = True

    out = strip_metadata(dirty, decoded=decoded_all)

    after = Image.open(io.BytesIO(out.data))
    assert (out.extension, after.n_frames) == ("png", 3) and out.data == data  # Pillow wrote no metadata
    assert leaked(out.data) == []


def test_png_with_an_unused_animation_control_chunk_is_published_still():
    """acTL after the image data is ignored by Pillow (one frame): the published file has none."""
    clean = encode(small(), "PNG")
    dirty = png_with_chunks(clean, [], [png_chunk(b"acTL", struct.pack(">II", 1, 0))])
    assert getattr(Image.open(io.BytesIO(dirty)), "n_frames", 1) == 1
    out = strip_metadata(dirty)
    assert b"acTL" not in out.data and out.data == clean


def test_clean_png_is_returned_unchanged():
    clean = encode(small(), "PNG")
    out = strip_metadata(clean)
    assert (out.data, out.extension, out.removed) == (clean, "png", False)


def test_png_with_a_bad_crc_raises():
    clean = encode(small(), "PNG")
    chunk = bytearray(png_chunk(b"tEXt", b"Author\x00" + SECRETS["png text"]))
    chunk[-1] ^= 0xFF
    with pytest.raises(DecodeError):
        strip_metadata(png_with_chunks(clean, [bytes(chunk)]))


# --------------------------------------------------------------------------------------------- WebP


def vp8x_flags(webp: bytes) -> int:
    assert webp[12:16] == b"VP8X"
    return webp[20]


@pytest.mark.parametrize(
    ("save", "orientation"),
    [({"lossless": True}, 6), ({"quality": 80}, 1), ({"lossless": True, "icc_profile": srgb_icc()}, 8)],
    ids=["lossless", "lossy-alpha", "icc"],
)
def test_webp_drops_exif_and_xmp(save, orientation):
    img = small()
    if "quality" in save:  # a real alpha channel (an opaque one is dropped by the encoder), never 0
        img.putalpha(Image.linear_gradient("L").resize(img.size).point(lambda v: max(v, 1)))
    exif = exif_block(orientation=orientation, thumbnail=b"\xff\xd8thumb\xff\xd9")
    dirty = encode(img, "WEBP", exif=exif, xmp=xmp_packet(gps=True), **save) + SECRETS["trailer"]
    before = Image.open(io.BytesIO(dirty))
    assert {"exif", "xmp"} <= set(before.info)

    out = strip_metadata(dirty)

    assert (out.extension, out.removed) == ("webp", True)
    assert struct.unpack_from("<I", out.data, 4)[0] == len(out.data) - 8
    flags = vp8x_flags(out.data)
    assert not flags & 0x04  # XMP
    assert bool(flags & 0x08) == (orientation != 1)  # EXIF
    assert bool(flags & 0x10) == ("quality" in save)  # alpha
    np.testing.assert_array_equal(decoded(out.data), decoded(dirty))
    assert leaked(out.data) == []
    after = Image.open(io.BytesIO(out.data))
    assert "xmp" not in after.info
    if "icc_profile" in save:
        check_icc(after.info.get("icc_profile"), save["icc_profile"])
    else:
        assert "icc_profile" not in after.info
    check_upright_exif_only(after, orientation)


def test_animated_webp_publishes_only_its_first_frame():
    frames = [small("rocket"), small()]
    dirty = encode(frames[0], "WEBP", lossless=True, save_all=True, append_images=frames[1:],
                   exif=exif_block(), xmp=xmp_packet())  # fmt: skip
    assert Image.open(io.BytesIO(dirty)).n_frames == 2

    out = strip_metadata(dirty)

    assert (out.extension, out.removed) == ("png", True)
    after = single_frame(out.data)
    assert after.format == "PNG" and after.info == {}
    np.testing.assert_array_equal(np.asarray(after.convert("RGB")), np.asarray(frames[0]))
    np.testing.assert_array_equal(decoded(out.data), decoded(dirty))
    assert leaked(out.data) == []


def test_simple_webp_is_returned_unchanged():
    clean = encode(small(), "WEBP", quality=85)
    assert clean[12:16] == b"VP8 "
    out = strip_metadata(clean)
    assert (out.data, out.removed) == (clean, False)


def test_truncated_webp_raises():
    dirty = encode(small(), "WEBP", lossless=True, exif=exif_block())
    with pytest.raises(DecodeError):
        strip_metadata(dirty[: len(dirty) // 2])


# ----------------------------------------------------------------------------------- other formats


def gif_with_xmp(img: Image.Image) -> bytes:
    """A GIF with a comment and an XMP application extension (Pillow writes no XMP: spliced in)."""
    gif = encode(img, "GIF", comment=SECRETS["comment"])
    xmp = xmp_packet(gps=True)
    blocks = b"".join(bytes((len(xmp[i : i + 255]),)) + xmp[i : i + 255] for i in range(0, len(xmp), 255))
    extension = b"\x21\xff\x0bXMP DataXMP" + blocks + b"\x00"
    flags = gif[10]
    at = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # after the header and global colour table
    return gif[:at] + extension + gif[at:]


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(gif_with_xmp, id="gif"),
        pytest.param(lambda img: encode(img, "TIFF", exif=exif_block(orientation=6)), id="tiff"),
        pytest.param(lambda img: encode(img, "BMP"), id="bmp"),
        pytest.param(lambda img: encode(img.convert("RGBA"), "TIFF", exif=exif_block()), id="tiff-rgba"),
    ],
)
def test_other_formats_become_a_lossless_png_of_the_decoded_pixels(build):
    dirty = build(small())
    out = strip_metadata(dirty)
    assert (out.extension, out.removed) == ("png", True)
    np.testing.assert_array_equal(decoded(out.data), decoded(dirty))
    after = Image.open(io.BytesIO(out.data))
    assert after.format == "PNG" and after.mode == "RGB" and after.info == {}
    assert dict(after.getexif()) == {}  # upright already: no orientation to keep
    assert leaked(out.data) == []


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "MPO"], ids=["animated-gif", "multi-page-tiff", "mpo"])
def test_other_multi_frame_files_publish_their_first_frame_only(fmt):
    first, face = small("rocket"), small()
    dirty = encode(first, fmt, save_all=True, append_images=[face], exif=exif_block())
    assert Image.open(io.BytesIO(dirty)).n_frames == 2

    out = strip_metadata(dirty)

    after = single_frame(out.data)
    # The MPO keeps its first JPEG byte for byte (lossless); the others become a PNG of frame 0.
    assert out.extension == ("jpg" if fmt == "MPO" else "png")
    tolerance = 0 if fmt == "TIFF" else 40  # GIF: a palette; JPEG: the codec
    assert np.abs(np.asarray(after.convert("RGB"), dtype=int) - np.asarray(first, dtype=int)).mean() < (
        tolerance or 1e-9
    )
    np.testing.assert_array_equal(decoded(out.data), decoded(dirty))
    assert leaked(out.data) == []


# ----------------------------------------------------------------------------------- hidden pixels


def test_colour_under_alpha_zero_is_zeroed_and_visible_pixels_kept():
    visible = small("rocket")
    secret = small()  # the face a loader would show under the transparent half
    rgba = hidden_under_alpha(visible, secret)
    dirty = encode(rgba, "PNG", icc_profile=srgb_icc())
    hidden = np.asarray(rgba)[..., 3] == 0
    assert np.asarray(Image.open(io.BytesIO(dirty)).convert("RGB"))[hidden].any()

    out = strip_metadata(dirty)

    assert (out.extension, out.removed) == ("png", True)
    after = Image.open(io.BytesIO(out.data))
    assert after.mode == "RGBA"
    pixels = np.asarray(after)
    np.testing.assert_array_equal(pixels[~hidden], np.asarray(rgba)[~hidden])  # visible: byte-identical
    assert (pixels[hidden] == 0).all()
    assert not np.asarray(after.convert("RGB"))[hidden].any()
    np.testing.assert_array_equal(decoded(out.data), np.asarray(after.convert("RGB")))  # the VLM's view


def test_hidden_colour_in_a_webp_becomes_a_png():
    rgba = hidden_under_alpha(small("rocket"), small())
    dirty = encode(rgba, "WEBP", lossless=True, exact=True)  # exact: libwebp keeps the hidden colour
    hidden = np.asarray(rgba)[..., 3] == 0
    assert np.asarray(Image.open(io.BytesIO(dirty)).convert("RGB"))[hidden].any()
    out = strip_metadata(dirty)
    after = Image.open(io.BytesIO(out.data))
    assert (out.extension, after.format) == ("png", "PNG")
    assert not np.asarray(after.convert("RGB"))[hidden].any()
    np.testing.assert_array_equal(np.asarray(after)[~hidden], np.asarray(rgba)[~hidden])


def test_palette_and_grey_alpha_hide_no_colour():
    palette = Image.new("P", (12, 8), 1)
    palette.putpalette([0, 0, 0, 20, 40, 200, 250, 10, 120, 30, 220, 90] + [0] * (256 * 3 - 12))
    palette.paste(2, (6, 0, 9, 8))  # index 2 and 3: transparent, with a colour
    palette.paste(3, (9, 0, 12, 8))
    trns = encode(palette, "PNG", transparency=bytes([255, 255, 0, 0]))
    la = np.zeros((8, 12, 2), dtype=np.uint8)
    la[:, :6] = (77, 255)
    la[:, 6:] = (200, 0)  # hidden grey
    for dirty in (trns, encode(Image.fromarray(la), "PNG")):
        out = strip_metadata(dirty)
        rgb = np.asarray(Image.open(io.BytesIO(out.data)).convert("RGB"))
        assert out.removed and not rgb[:, 6:].any()  # the transparent half shows no colour
        np.testing.assert_array_equal(rgb[:, :6], np.asarray(load_rgb(dirty))[:, :6])
        assert rgb[0, 0].any()


def test_transparent_pixels_without_colour_keep_the_lossless_path():
    rgba = hidden_under_alpha(small("rocket"), Image.new("RGB", (4, 4)))  # black under alpha 0
    clean = encode(rgba, "PNG")
    dirty = png_with_chunks(clean, [png_chunk(b"tEXt", b"Author\x00" + SECRETS["png text"])])
    out = strip_metadata(dirty)
    assert out.data == clean and Image.open(io.BytesIO(out.data)).mode == "RGBA"


# --------------------------------------------------------------------------------------------- ICC


def test_icc_text_tags_and_png_profile_name_are_neutral():
    profile = icc_profile()
    img = small("rocket")
    files = {
        "jpg": encode(img, "JPEG", quality=90, icc_profile=profile),
        "png": png_with_icc_name(encode(img, "PNG"), profile),
        "webp": encode(img, "WEBP", lossless=True, icc_profile=profile),
    }
    planted = [ICC_DESC_PERSON, ICC_COPYRIGHT_PERSON, ICC_DEVICE_PERSON, ICC_PNG_NAME]
    for extension, dirty in files.items():
        assert Image.open(io.BytesIO(dirty)).info["icc_profile"] == profile
        out = strip_metadata(dirty)
        assert out.extension == extension and out.removed
        for text in planted:
            assert text.encode() not in out.data and text.encode("utf-16-be") not in out.data, extension
        check_icc(Image.open(io.BytesIO(out.data)).info.get("icc_profile"), profile)
        np.testing.assert_array_equal(decoded(out.data), decoded(dirty))
    assert b"iCCP" + b"ICC Profile\x00" in strip_metadata(files["png"]).data


def test_icc_profile_split_over_jpeg_segments_is_rebuilt_whole():
    profile = icc_profile(description="x" * 70_000)  # over one APP2 segment's 65 519 bytes
    dirty = encode(small(), "JPEG", quality=90, icc_profile=profile)
    assert dirty.count(b"ICC_PROFILE\x00") == 3
    out = strip_metadata(dirty)
    assert out.data.count(b"ICC_PROFILE\x00") == 1 and b"x" * 100 not in out.data
    check_icc(Image.open(io.BytesIO(out.data)).info.get("icc_profile"), profile)


@pytest.mark.parametrize("profile", [b"", b"not a profile" * 20, icc_profile()[:200]], ids=str)
def test_unparseable_icc_profiles_are_dropped(profile):
    assert sanitize_icc(profile) is None
    if profile:
        dirty = encode(small(), "WEBP", lossless=True, icc_profile=profile)
        out = strip_metadata(dirty)
        assert b"ICCP" not in out.data and not vp8x_flags(out.data) & 0x20


# ------------------------------------------------------------------------------------- keep policy


def test_metadata_keep_still_publishes_one_frame_and_no_hidden_colour():
    jpeg = encode(small(), "JPEG", exif=exif_block())
    assert publishable(jpeg, decode_image(jpeg), strip=False) == Stripped(jpeg, "jpg", False)
    for dirty in (apng_hiding_a_face(), encode(hidden_under_alpha(small("rocket"), small()), "PNG")):
        out = publishable(dirty, decode_image(dirty), strip=False)
        after = single_frame(out.data)
        assert out.removed and out.extension == "png"
        np.testing.assert_array_equal(np.asarray(after.convert("RGB")), decoded(dirty))


@pytest.mark.parametrize(
    "data", [b"", b"not an image at all", b"\xff\xd8\xff\xe0garbage", b"\x89PNG\r\n\x1a\nxx"]
)
def test_non_images_raise(data):
    with pytest.raises(DecodeError):
        strip_metadata(data)


def test_re_encode_respects_max_pixels():
    gif = encode(small(), "GIF")
    with pytest.raises(DecodeError, match="too large"):
        strip_metadata(gif, max_pixels=100)
    assert strip_metadata(gif, max_pixels=SMALL[0] * SMALL[1]).extension == "png"


# -------------------------------------------------------------------------------------- leak corpus


def test_leak_corpus_files_publish_no_secret_and_the_same_pixels(tmp_path):
    corpus = build_leak_corpus(tmp_path)
    for path in corpus.files:
        data = path.read_bytes()
        out = strip_metadata(data)
        assert corpus.leaks(out.data) == [], path.name
        np.testing.assert_array_equal(decoded(out.data), decoded(data))
        assert out.removed == (path != corpus.texture)
        frames = {".jpg": "jpg", ".png": "png", ".webp": "webp", ".gif": "png", ".tif": "png"}
        assert out.extension == ("png" if path.name.startswith("animation") else frames[path.suffix])
        single_frame(out.data)
    assert len(corpus.multi_frame) == 5 and all(Image.open(p).n_frames > 1 for p in corpus.multi_frame)
    upright = Image.open(io.BytesIO(strip_metadata(corpus.person_named.read_bytes()).data))
    check_upright_exif_only(upright, 6)

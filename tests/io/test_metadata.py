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

from u2s.io.decode import DecodeError, load_rgb
from u2s.io.metadata import Stripped, strip_metadata
from u2s.testing.leak_corpus import (
    ARTIST,
    CAMERA_SERIAL,
    DATETIME_ORIGINAL,
    GPS_LATITUDE,
    GPS_LONGITUDE,
    IPTC_BYLINE,
    IPTC_CAPTION,
    XMP_APP1,
    XMP_PERSON,
    build_leak_corpus,
    encode,
    exif_block,
    extended_xmp_segment,
    gps_rational_bytes,
    insert_jpeg_segments,
    iptc_segment,
    jpeg_segment,
    photo,
    png_chunk,
    png_with_chunks,
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


@pytest.mark.parametrize("save", [{}, {"progressive": True}, {"restart_marker_rows": 1}], ids=str)
def test_jpeg_drops_every_metadata_segment_and_keeps_the_scans_byte_for_byte(save):
    img = small()
    thumbnail = encode(img.resize((24, 16)), "JPEG", quality=70)
    dirty, clean = dirty_jpeg(img, thumbnail, **save)
    before = Image.open(io.BytesIO(dirty))
    assert {"exif", "xmp", "comment", "photoshop", "icc_profile"} <= set(before.info)
    assert before.getexif().get_ifd(ExifTags.IFD.GPSInfo)

    out = strip_metadata(dirty)

    assert (out.extension, out.removed) == ("jpg", True)
    assert out.data.endswith(tables_and_scans(clean))  # tables and entropy-coded data untouched
    np.testing.assert_array_equal(decoded(out.data), decoded(dirty))
    assert leaked(out.data, (thumbnail[thumbnail.index(b"\xff\xda") :],)) == []
    after = Image.open(io.BytesIO(out.data))
    assert after.format == "JPEG"
    assert not {"xmp", "comment", "photoshop", "flashpix", "mp", "mpoffset"} & set(after.info)
    assert after.info["icc_profile"] == srgb_icc()  # colour rendering kept
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


def test_malformed_jpeg_is_re_encoded_not_leaked():
    """Garbage between segments (libjpeg skips it): not parsed with certainty, so re-encoded as PNG."""
    clean = encode(small(), "JPEG", quality=90, exif=exif_block(orientation=3))
    dqt = clean.index(b"\xff\xdb")
    dirty = clean[:dqt] + b"\x00\x13\x37" + clean[dqt:]
    np.asarray(load_rgb(dirty))  # still decodable

    out = strip_metadata(dirty)

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
    if mode == "RGBA":
        img.putalpha(Image.linear_gradient("L").resize(img.size))
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
    assert after.info.get("icc_profile") == save.get("icc_profile")
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


def test_animated_png_keeps_its_frames():
    frames = [small(), small("coffee")]
    clean = encode(frames[0], "PNG", save_all=True, append_images=frames[1:])
    dirty = png_with_chunks(clean, [png_chunk(b"tEXt", b"Author\x00" + SECRETS["png text"])])
    out = strip_metadata(dirty)
    after = Image.open(io.BytesIO(out.data))
    assert after.n_frames == 2
    np.testing.assert_array_equal(decoded(out.data), decoded(dirty))
    assert leaked(out.data) == []


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
    if "quality" in save:  # a real alpha channel (an opaque one is dropped by the encoder)
        img.putalpha(Image.linear_gradient("L").resize(img.size))
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
    assert "xmp" not in after.info and after.info.get("icc_profile") == save.get("icc_profile")
    check_upright_exif_only(after, orientation)


def test_animated_webp_keeps_its_frames():
    frames = [small(), small("coffee")]
    dirty = encode(
        frames[0],
        "WEBP",
        lossless=True,
        save_all=True,
        append_images=frames[1:],
        exif=exif_block(),
        xmp=xmp_packet(),
    )
    out = strip_metadata(dirty)
    after = Image.open(io.BytesIO(out.data))
    assert after.n_frames == 2 and "exif" not in after.info and "xmp" not in after.info
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
        assert out.extension == {".jpg": "jpg", ".png": "png", ".webp": "webp", ".gif": "png"}[path.suffix]
    upright = Image.open(io.BytesIO(strip_metadata(corpus.person_named.read_bytes()).data))
    check_upright_exif_only(upright, 6)

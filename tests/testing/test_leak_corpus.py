"""The leak corpus really carries what it lists: Pillow reads every secret back from the files written."""

from __future__ import annotations

import io

import pytest
from PIL import ExifTags, Image

from u2s.testing.leak_corpus import (
    ARTIST,
    CAMERA_SERIAL,
    DATETIME_ORIGINAL,
    GIF_COMMENT,
    GPS_LATITUDE,
    GPS_LONGITUDE,
    IPTC_BYLINE,
    JPEG_COMMENT,
    PERSON_FILE,
    PERSON_FOLDER,
    PNG_AUTHOR,
    PNG_ITXT_PERSON,
    PNG_ZTXT_NOTE,
    WEBP_PERSON,
    XMP_PERSON,
    LeakCorpus,
    build_leak_corpus,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> LeakCorpus:
    return build_leak_corpus(tmp_path_factory.mktemp("leak"))


def opened(path) -> Image.Image:
    img = Image.open(path)
    img.load()
    return img


def test_every_listed_secret_is_in_every_file_that_carries_it(corpus):
    assert {secret.name for secret in corpus.secrets} >= {"gps", "capture_time", "exif_artist", "png_author"}
    for secret in corpus.secrets:
        assert secret.files and secret.forms
        for path in secret.files:
            carrier = str(path).encode() if secret.in_path else path.read_bytes()
            assert secret.found_in(carrier), (secret.name, path.name)
            assert secret.name in corpus.leaks(carrier)


def test_files_are_real_images_of_the_stated_formats(corpus):
    formats = {opened(path).format for path in corpus.files}
    assert formats == {"JPEG", "PNG", "WEBP", "GIF", "TIFF", "MPO"}
    assert all(min(opened(path).size) >= 256 for path in corpus.files)  # real photos, not thumbnails
    assert corpus.files == tuple(sorted(corpus.files)) and all(p.is_file() for p in corpus.files)
    assert corpus.person_named.relative_to(corpus.root).parts == (PERSON_FOLDER, PERSON_FILE)


def test_person_named_jpeg_carries_gps_time_owner_serial_and_a_thumbnail(corpus):
    img = opened(corpus.person_named)
    exif = img.getexif()
    assert exif[ExifTags.Base.Artist] == ARTIST
    assert exif[ExifTags.Base.XPAuthor].decode("utf-16-le").rstrip("\x00") == ARTIST
    assert exif[ExifTags.Base.Orientation] == 6
    sub = exif.get_ifd(ExifTags.IFD.Exif)
    assert sub[ExifTags.Base.DateTimeOriginal] == DATETIME_ORIGINAL
    assert sub[ExifTags.Base.BodySerialNumber] == CAMERA_SERIAL
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    assert gps[ExifTags.GPS.GPSLatitudeRef] == "N" and gps[ExifTags.GPS.GPSLongitudeRef] == "E"
    assert [float(v) for v in gps[ExifTags.GPS.GPSLatitude]] == pytest.approx(GPS_LATITUDE)
    assert [float(v) for v in gps[ExifTags.GPS.GPSLongitude]] == pytest.approx(GPS_LONGITUDE)
    ifd1 = exif.get_ifd(ExifTags.IFD.IFD1)
    start, length = ifd1[ExifTags.Base.JpegIFOffset], ifd1[ExifTags.Base.JpegIFByteCount]
    thumbnail = img.info["exif"][6 + start : 6 + start + length]
    assert Image.open(io.BytesIO(thumbnail)).size == (160, 160)
    thumbnail_secret = next(s for s in corpus.secrets if s.name == "exif_thumbnail")
    assert thumbnail_secret.found_in(thumbnail)


def test_other_files_carry_xmp_iptc_text_chunks_and_comments(corpus):
    beach, receipt, party, cat = (
        corpus.root / "trip" / n for n in ("beach.jpg", "receipt.png", "party.webp", "cat.gif")
    )
    info = opened(beach).info
    assert XMP_PERSON.encode() in info["xmp"] and info["comment"] == JPEG_COMMENT.encode()
    assert IPTC_BYLINE.encode() in info["photoshop"][0x0404]
    info = opened(receipt).info
    assert (info["Author"], info["Description"], info["Comment"]) == (
        PNG_AUTHOR,
        PNG_ITXT_PERSON,
        PNG_ZTXT_NOTE,
    )
    assert opened(receipt).getexif().get_ifd(ExifTags.IFD.GPSInfo)
    img = opened(party)
    assert img.getexif()[ExifTags.Base.Artist] == WEBP_PERSON and WEBP_PERSON.encode() in img.info["xmp"]
    assert opened(cat).info["comment"] == GIF_COMMENT.encode()


def test_texture_carries_nothing(corpus):
    img = opened(corpus.texture)
    assert img.info == {} and dict(img.getexif()) == {}
    assert corpus.leaks(corpus.texture.read_bytes()) == []
    assert not any(corpus.texture in secret.files for secret in corpus.secrets)


def test_texture_has_no_face_and_no_text_for_the_baseline_detectors(corpus):
    """The corpus's "flagged, but the baseline finds nothing" image: the real detectors find no region."""
    from u2s.io.decode import load_rgb
    from u2s.stage2.detectors import detect_regions
    from u2s.stage2.editors.baselines import BlurConfig

    texture = load_rgb(corpus.texture.read_bytes())
    assert detect_regions(texture, BlurConfig(regions=["faces", "text"])) == []
    astronaut = load_rgb(corpus.person_named.read_bytes())  # the detectors do work on this corpus
    assert detect_regions(astronaut, BlurConfig(regions=["faces"]))

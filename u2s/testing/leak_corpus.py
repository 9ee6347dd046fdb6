"""A leak test corpus: real photos carrying private metadata and private names, with every secret listed.

:func:`build_leak_corpus` writes a small image folder whose files carry the private information a
published dataset must not: EXIF GPS coordinates, capture time, owner names and a camera serial, an EXIF
thumbnail, XMP and IPTC captions naming people, PNG text chunks, WebP EXIF/XMP, a GIF comment, and a file
and a folder named after people. :class:`LeakCorpus` lists each secret as the byte strings that would
appear if it leaked, so a test can scan any output (Parquet bytes, logs) for all of them.

The pictures are real photographs shipped with scikit-image and scikit-learn (``pip install
scikit-image scikit-learn``), so detectors and models see realistic content. The metadata builders
(:func:`exif_block`, :func:`xmp_packet`, :func:`iptc_segment`, :func:`insert_jpeg_segments`,
:func:`png_with_chunks`) are public for tests that need more specific files.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.TiffImagePlugin import IFDRational

ARTIST = "Rosalind Quennell-Abara"
XMP_PERSON = "Marguerite Okonkwo-Lindqvist"
PNG_AUTHOR = "Tobias Wrenfield-Ito"
PNG_ITXT_PERSON = "Zoë Marchetti-Halvorsen"
PNG_ZTXT_NOTE = "Medical visit with Dr. Ilse Brandvold at Saint Aurelian clinic"
CAMERA_SERIAL = "U2S-SN-4417-0932-XQ"
DATETIME_ORIGINAL = "2019:07:14 15:22:41"
IPTC_BYLINE = "Cornelius Achterberg-Nwosu"
IPTC_CAPTION = "Family reunion at 14 Larkspur Close"
JPEG_COMMENT = "Taken at the home of Priya Vanterpool-Sato"
GIF_COMMENT = "Gift for Hamid Oyelaran-Vance"
WEBP_PERSON = "Ingrid Solberg-Mwangi"
ICC_DESC_PERSON = "Monitor of Henrietta Vasquez-Oyelowo"
ICC_COPYRIGHT_PERSON = "Barnaby Okafor-Lindgren, all rights reserved"
ICC_DEVICE_PERSON = "Phone of Ludmila Ferreira-Tanaka"
ICC_PNG_NAME = "Profile of Severin Achebe-Holm"
#: A person's name as a file name, and another as the folder holding it.
PERSON_FILE = "jane_doe_passport.jpg"
PERSON_FOLDER = "amelie_fontaine"
#: GPS position (degrees, minutes, seconds) of the photos; seconds carry 4 decimals, as phones write them.
GPS_LATITUDE = (47, 22, 11.6274)
GPS_LONGITUDE = (8, 32, 27.9931)

_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825


# ------------------------------------------------------------------------------------ metadata builders


def jpeg_segment(marker: int, payload: bytes) -> bytes:
    """One JPEG marker segment (``0xFF``, marker, big-endian length, payload)."""
    return bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload


def insert_jpeg_segments(jpeg: bytes, segments: list[bytes]) -> bytes:
    """``jpeg`` with ``segments`` inserted after SOI and the segments Pillow wrote before its tables."""
    pos = 2
    while jpeg[pos + 1] in (0xE0, 0xE1):  # after JFIF and EXIF, before DQT
        pos += 2 + struct.unpack_from(">H", jpeg, pos + 2)[0]
    return jpeg[:pos] + b"".join(segments) + jpeg[pos:]


def _dms(value: tuple[int, int, float]) -> tuple[IFDRational, ...]:
    degrees, minutes, seconds = value
    return IFDRational(degrees, 1), IFDRational(minutes, 1), IFDRational(round(seconds * 10_000), 10_000)


def decimal_degrees(value: tuple[int, int, float]) -> float:
    """Degrees, minutes, seconds → decimal degrees."""
    degrees, minutes, seconds = value
    return degrees + minutes / 60 + seconds / 3600


def exif_block(
    *,
    artist: str | None = ARTIST,
    serial: str | None = CAMERA_SERIAL,
    datetime_original: str | None = DATETIME_ORIGINAL,
    gps: bool = True,
    orientation: int | None = None,
    thumbnail: bytes | None = None,
) -> bytes:
    """An EXIF block (``Exif\\0\\0`` + TIFF) as a camera writes it.

    IFD0 holds Artist (ASCII) and XPAuthor (Windows, UTF-16LE) and Orientation, the Exif IFD
    DateTimeOriginal and BodySerialNumber, the GPS IFD latitude and longitude as rationals, and IFD1 a
    JPEG thumbnail (Pillow does not write IFD1, so it is appended here by hand).
    """
    exif = Image.Exif()
    if artist:
        exif[0x013B] = artist
        exif[0x9C9D] = artist.encode("utf-16-le") + b"\x00\x00"  # XPAuthor
    if orientation:
        exif[0x0112] = orientation
    exif_ifd = exif.get_ifd(_EXIF_IFD)
    if datetime_original:
        exif_ifd[0x9003] = datetime_original
    if serial:
        exif_ifd[0xA431] = serial
    if gps:
        exif.get_ifd(_GPS_IFD).update(
            {0: b"\x02\x03\x00\x00", 1: "N", 2: _dms(GPS_LATITUDE), 3: "E", 4: _dms(GPS_LONGITUDE)}
        )
    block = exif.tobytes()
    return block if thumbnail is None else _with_thumbnail(block, thumbnail)


def _with_thumbnail(block: bytes, thumbnail: bytes) -> bytes:
    """Append IFD1 (a JPEG thumbnail: Compression 6, JPEGInterchangeFormat, ...Length) to an EXIF block."""
    tiff = bytearray(block[6:])
    order = ">" if tiff[:2] == b"MM" else "<"
    ifd0 = struct.unpack_from(order + "I", tiff, 4)[0]
    count = struct.unpack_from(order + "H", tiff, ifd0)[0]
    tiff += b"\x00" * (len(tiff) & 1)
    ifd1 = len(tiff)
    struct.pack_into(order + "I", tiff, ifd0 + 2 + 12 * count, ifd1)
    data_at = ifd1 + 2 + 3 * 12 + 4
    tiff += struct.pack(order + "H", 3)
    tiff += struct.pack(order + "HHIHH", 0x0103, 3, 1, 6, 0)  # Compression: JPEG
    tiff += struct.pack(order + "HHII", 0x0201, 4, 1, data_at)  # JPEGInterchangeFormat
    tiff += struct.pack(order + "HHII", 0x0202, 4, 1, len(thumbnail))  # JPEGInterchangeFormatLength
    tiff += struct.pack(order + "I", 0) + thumbnail
    return block[:6] + bytes(tiff)


def gps_rational_bytes(value: tuple[int, int, float], block: bytes) -> bytes:
    """The 24 bytes of a GPS coordinate's three rationals as they appear in EXIF ``block``."""
    order = ">" if block[6:8] == b"MM" else "<"
    return b"".join(struct.pack(order + "II", r.numerator, r.denominator) for r in _dms(value))


def xmp_packet(
    creator: str = XMP_PERSON, description: str = "", orientation: int | None = None, gps: bool = False
) -> bytes:
    """An XMP packet (UTF-8) naming ``creator``, with an optional description, orientation and GPS."""
    lat, lon = decimal_degrees(GPS_LATITUDE), decimal_degrees(GPS_LONGITUDE)
    extra = f' tiff:Orientation="{orientation}"' if orientation else ""
    if gps:
        extra += f' exif:GPSLatitude="{lat:.6f}N" exif:GPSLongitude="{lon:.6f}E"'
        extra += f' exif:DateTimeOriginal="{DATETIME_ORIGINAL.replace(":", "-", 2).replace(" ", "T")}"'
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/"'
        ' xmlns:tiff="http://ns.adobe.com/tiff/1.0/" xmlns:exif="http://ns.adobe.com/exif/1.0/"'
        f"{extra}><dc:creator><rdf:Seq><rdf:li>{creator}</rdf:li></rdf:Seq></dc:creator>"
        f'<dc:description><rdf:Alt><rdf:li xml:lang="x-default">{description}</rdf:li></rdf:Alt>'
        '</dc:description></rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    ).encode()


XMP_APP1 = b"http://ns.adobe.com/xap/1.0/\x00"
XMP_EXTENSION_APP1 = b"http://ns.adobe.com/xmp/extension/\x00"


def extended_xmp_segment(text: str) -> bytes:
    """An extended-XMP APP1 segment (GUID, full length, offset, then the UTF-8 text)."""
    data = text.encode()
    payload = XMP_EXTENSION_APP1 + b"0" * 32 + struct.pack(">II", len(data), 0) + data
    return jpeg_segment(0xE1, payload)


def iptc_segment(byline: str = IPTC_BYLINE, caption: str = IPTC_CAPTION) -> bytes:
    """An APP13 "Photoshop 3.0" segment holding IPTC-IIM By-line (2:80) and Caption (2:120)."""
    iptc = b"".join(
        b"\x1c\x02" + bytes((dataset,)) + struct.pack(">H", len(value)) + value
        for dataset, value in ((80, byline.encode()), (120, caption.encode()))
    )
    resource = b"8BIM" + struct.pack(">H", 0x0404) + b"\x00\x00" + struct.pack(">I", len(iptc)) + iptc
    return jpeg_segment(0xED, b"Photoshop 3.0\x00" + resource + b"\x00" * (len(iptc) & 1))


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk (length, type, body, CRC)."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_with_chunks(png: bytes, before_idat: list[bytes], after_idat: list[bytes] = ()) -> bytes:
    """``png`` with chunks inserted before its first IDAT and before IEND."""
    first_idat = png.index(b"IDAT") - 4
    iend = png.rindex(b"IEND") - 4
    return png[:first_idat] + b"".join(before_idat) + png[first_idat:iend] + b"".join(after_idat) + png[iend:]


def _mluc(text: str) -> bytes:
    encoded = text.encode("utf-16-be")
    return b"mluc" + struct.pack(">III2s2sII", 0, 1, 12, b"en", b"US", len(encoded), 28) + encoded


def icc_profile(
    description: str = ICC_DESC_PERSON, copyright: str = ICC_COPYRIGHT_PERSON, device: str = ICC_DEVICE_PERSON
) -> bytes:
    """Little CMS's sRGB profile as a calibration tool might leave it: its description, copyright and
    device-model (``dmdd``) tags name people. Deterministic (the same bytes on every call)."""
    from PIL import ImageCms

    base = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    count = struct.unpack_from(">I", base, 128)[0]
    tags = {}
    for index in range(count):
        signature, offset, length = struct.unpack_from(">4sII", base, 132 + 12 * index)
        tags[signature] = base[offset : offset + length]
    tags.update({b"desc": _mluc(description), b"cprt": _mluc(copyright), b"dmdd": _mluc(device)})
    table, body = [], b""
    start = 132 + 12 * len(tags)
    for signature, data in tags.items():
        table.append(struct.pack(">4sII", signature, start + len(body), len(data)))
        body += data + b"\x00" * (-len(data) % 4)
    profile = bytearray(base[:128] + struct.pack(">I", len(tags)) + b"".join(table) + body)
    profile[0:4] = struct.pack(">I", len(profile))
    profile[24:36] = struct.pack(
        ">6H", 2019, 7, 14, 15, 22, 41
    )  # a fixed creation date: same bytes every call
    return bytes(profile)


def png_with_icc_name(png: bytes, profile: bytes, name: str = ICC_PNG_NAME) -> bytes:
    """``png`` with an ``iCCP`` chunk holding ``profile`` under the free-text profile ``name``."""
    chunk = png_chunk(b"iCCP", name.encode("latin-1") + b"\x00\x00" + zlib.compress(profile))
    return png_with_chunks(png, [chunk])


def hidden_under_alpha(img: Image.Image, secret: Image.Image) -> Image.Image:
    """``img`` as RGBA whose right half is fully transparent and holds ``secret``'s pixels: a browser
    shows nothing there, ``convert("RGB")`` shows ``secret``."""
    out = img.convert("RGBA")
    half = (out.width // 2, 0, out.width, out.height)
    out.paste(secret.convert("RGB").resize((half[2] - half[0], out.height)), half[:2])
    alpha = Image.new("L", out.size, 255)
    alpha.paste(0, half)
    out.putalpha(alpha)
    return out


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    """``img`` encoded as ``fmt`` with Pillow's save options ``kwargs``."""
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- photos


def photo(name: str) -> Image.Image:
    """A real photograph: ``astronaut``, ``chelsea``, ``coffee``, ``brick`` (scikit-image) or ``china``,
    ``flower`` (scikit-learn)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        array = load_sample_image(f"{name}.jpg")
    else:
        import skimage.data

        array = getattr(skimage.data, name)()
    return Image.fromarray(np.ascontiguousarray(array))


# ------------------------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class Secret:
    """One piece of private information and the byte strings that reveal it."""

    name: str
    forms: tuple[bytes, ...]
    """Byte strings any of which, found in an output, means this secret leaked."""
    files: tuple[Path, ...]
    """Corpus files that carry it (in their bytes, or in their path for a name in a path)."""
    in_path: bool = False
    """The secret is in the files' paths, not in their bytes."""

    def found_in(self, blob: bytes) -> bool:
        """Whether any form of the secret occurs in ``blob``."""
        return any(form in blob for form in self.forms)


@dataclass(frozen=True)
class LeakCorpus:
    """The files :func:`build_leak_corpus` wrote and every secret they carry."""

    root: Path
    files: tuple[Path, ...]
    """Every image, sorted."""
    person_named: Path
    """The file named after a person, in a folder named after a person (its EXIF carries GPS too)."""
    texture: Path
    """A plain texture with no face and no text and no metadata (a baseline finds nothing in it)."""
    secrets: tuple[Secret, ...]
    multi_frame: tuple[Path, ...] = ()
    """Files with several frames: a harmless frame 0 (what ``load_rgb`` decodes, an APNG's default
    image), the astronaut's face in a later frame that a player shows."""
    alpha_hidden: Path | None = None
    """A PNG whose fully transparent half holds a page of text (``convert("RGB")`` shows it)."""

    def leaks(self, blob: bytes) -> list[str]:
        """Names of the secrets found in ``blob`` (empty when nothing leaked)."""
        return [secret.name for secret in self.secrets if secret.found_in(blob)]


def _text_forms(*texts: str) -> tuple[bytes, ...]:
    """UTF-8 and UTF-16 (both byte orders) encodings of each text."""
    return tuple(
        dict.fromkeys(t.encode(codec) for t in texts for codec in ("utf-8", "utf-16-le", "utf-16-be"))
    )


def _scan_slice(jpeg: bytes, size: int = 64) -> bytes:
    """``size`` bytes from the middle of a JPEG's entropy-coded data (unique to that JPEG)."""
    start = jpeg.index(b"\xff\xda")
    start += 2 + struct.unpack_from(">H", jpeg, start + 2)[0]
    middle = start + (len(jpeg) - 2 - start) // 2
    return jpeg[middle : middle + size]


def build_leak_corpus(folder: Path) -> LeakCorpus:
    """Write the leak corpus under ``folder`` (created if missing) and list what it carries.

    Layout::

        amelie_fontaine/jane_doe_passport.jpg   astronaut; EXIF: GPS, DateTimeOriginal, Artist, XPAuthor,
                                                BodySerialNumber, a JPEG thumbnail;
                                                stored sideways with Orientation 6
        trip/beach.jpg                          china; XMP (creator, GPS, time), extended XMP, IPTC
                                                by-line and caption, a JPEG comment
        trip/receipt.png                        coffee; tEXt Author, iTXt (UTF-8 name), zTXt note, tIME,
                                                eXIf (GPS, time, serial)
        trip/party.webp                         flower, lossless; EXIF (Artist, GPS) and XMP (a name)
        trip/cat.gif                            chelsea; a GIF comment naming a person
        textures/brick.png                      brick; no face, no text, no metadata
        frames/animation.png                    APNG: default image rocket, not part of its animation
                                                (astronaut, brick)
        frames/animation.webp                   animated WebP: hubble deep field, then the astronaut
        frames/animation.gif                    animated GIF: immunohistochemistry, then the astronaut
        frames/pages.tif                        multi-page TIFF: the camera man, then the astronaut
        frames/stereo.jpg                       MPO: colour wheel, then the astronaut
        frames/sticker.png                      clock, right half fully transparent over a page of text
        frames/profile.jpg, frames/profile.png  grass, moon; an ICC profile whose description, copyright
                                                and device model name people (the PNG's iCCP name too)
    """
    folder = Path(folder)
    for sub in (PERSON_FOLDER, "trip", "textures", "frames"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    person_named = folder / PERSON_FOLDER / PERSON_FILE
    beach, receipt = folder / "trip" / "beach.jpg", folder / "trip" / "receipt.png"
    party, cat, texture = (
        folder / "trip" / "party.webp",
        folder / "trip" / "cat.gif",
        folder / "textures" / "brick.png",
    )

    # Stored as a phone stores a portrait shot: sideways, with Orientation 6 to show it upright.
    astronaut = photo("astronaut").transpose(Image.Transpose.ROTATE_90)
    thumbnail = encode(astronaut.resize((160, 160)), "JPEG", quality=75)
    passport_exif = exif_block(orientation=6, thumbnail=thumbnail)
    person_named.write_bytes(encode(astronaut, "JPEG", quality=90, exif=passport_exif))

    beach_xmp = xmp_packet(XMP_PERSON, f"Holiday photo of {XMP_PERSON}", gps=True)
    beach.write_bytes(
        insert_jpeg_segments(
            encode(photo("china"), "JPEG", quality=90, comment=JPEG_COMMENT.encode()),
            [
                jpeg_segment(0xE1, XMP_APP1 + beach_xmp),
                extended_xmp_segment(f"<rdf:li>{XMP_PERSON}</rdf:li>"),
                iptc_segment(),
            ],
        )
    )

    receipt_exif = exif_block(artist=None, thumbnail=None)
    ztxt_body = zlib.compress(PNG_ZTXT_NOTE.encode("latin-1"))
    time_body = struct.pack(">HBBBBB", 2019, 7, 14, 15, 22, 41)
    receipt.write_bytes(
        png_with_chunks(
            encode(photo("coffee"), "PNG"),
            [
                png_chunk(b"tEXt", b"Author\x00" + PNG_AUTHOR.encode("latin-1")),
                png_chunk(b"iTXt", b"Description\x00\x00\x00\x00\x00" + PNG_ITXT_PERSON.encode()),
                png_chunk(b"zTXt", b"Comment\x00\x00" + ztxt_body),
                png_chunk(b"eXIf", receipt_exif[6:]),
            ],
            [png_chunk(b"tIME", time_body)],
        )
    )

    webp_exif = exif_block(artist=WEBP_PERSON, serial=None, thumbnail=None)
    party.write_bytes(
        encode(photo("flower"), "WEBP", lossless=True, exif=webp_exif, xmp=xmp_packet(WEBP_PERSON))
    )
    encode_gif = encode(photo("chelsea"), "GIF", comment=GIF_COMMENT.encode())
    cat.write_bytes(encode_gif)
    texture.write_bytes(encode(photo("brick"), "PNG"))
    multi_frame, alpha_hidden, icc_files = _frames_and_pixels(folder / "frames", astronaut)

    lat, lon = decimal_degrees(GPS_LATITUDE), decimal_degrees(GPS_LONGITUDE)
    gps_forms = (
        gps_rational_bytes(GPS_LATITUDE, passport_exif),
        gps_rational_bytes(GPS_LONGITUDE, passport_exif),
        gps_rational_bytes(GPS_LATITUDE, webp_exif),
        *(f"{v:.6f}".encode() for v in (lat, lon)),
    )
    time_forms = (DATETIME_ORIGINAL.encode(), b"2019-07-14T15:22:41", time_body)
    secrets = (
        Secret("exif_artist", _text_forms(ARTIST), (person_named,)),
        Secret("exif_serial", _text_forms(CAMERA_SERIAL), (person_named, receipt)),
        Secret("capture_time", time_forms, (person_named, beach, receipt)),
        Secret("gps", tuple(dict.fromkeys(gps_forms)), (person_named, beach, receipt, party)),
        Secret("exif_thumbnail", (_scan_slice(thumbnail),), (person_named,)),
        Secret("xmp_person", _text_forms(XMP_PERSON), (beach,)),
        Secret("iptc", _text_forms(IPTC_BYLINE, IPTC_CAPTION), (beach,)),
        Secret("jpeg_comment", _text_forms(JPEG_COMMENT), (beach,)),
        Secret("png_author", _text_forms(PNG_AUTHOR), (receipt,)),
        Secret("png_itxt_person", _text_forms(PNG_ITXT_PERSON), (receipt,)),
        Secret("png_ztxt_note", (*_text_forms(PNG_ZTXT_NOTE), ztxt_body), (receipt,)),
        Secret("webp_person", _text_forms(WEBP_PERSON), (party,)),
        Secret("gif_comment", _text_forms(GIF_COMMENT), (cat,)),
        Secret(
            "icc_text",  # the PNG carries the profile compressed
            (
                *_text_forms(ICC_DESC_PERSON, ICC_COPYRIGHT_PERSON, ICC_DEVICE_PERSON),
                zlib.compress(icc_profile()),
            ),
            icc_files,
        ),
        Secret("icc_png_name", _text_forms(ICC_PNG_NAME), icc_files[1:]),
        Secret("person_file_name", _text_forms("jane_doe", "jane doe", "Jane Doe"), (person_named,), True),
        Secret("person_folder_name", _text_forms(PERSON_FOLDER), (person_named,), True),
    )
    files = tuple(sorted((person_named, beach, receipt, party, cat, texture, *multi_frame, alpha_hidden,
                          *icc_files)))  # fmt: skip
    return LeakCorpus(folder, files, person_named, texture, secrets, multi_frame, alpha_hidden)


def _frames_and_pixels(
    folder: Path, astronaut: Image.Image
) -> tuple[tuple[Path, ...], Path, tuple[Path, ...]]:
    """The multi-frame files, the alpha-hidden PNG and the ICC files of :func:`build_leak_corpus`."""
    size = (384, 288)  # real photos, not thumbnails
    face = astronaut.transpose(Image.Transpose.ROTATE_270).resize(size)  # upright again
    frame0 = {name: photo(name).convert("RGB").resize(size) for name in
              ("rocket", "hubble_deep_field", "immunohistochemistry", "camera", "colorwheel")}  # fmt: skip
    builds = {
        "animation.png": lambda: encode(frame0["rocket"], "PNG", save_all=True, default_image=True,
                                        append_images=[face, photo("brick").convert("RGB").resize(size)]),
        "animation.webp": lambda: encode(frame0["hubble_deep_field"], "WEBP", save_all=True, lossless=True,
                                         append_images=[face]),
        "animation.gif": lambda: encode(frame0["immunohistochemistry"], "GIF", save_all=True,
                                        append_images=[face]),
        "pages.tif": lambda: encode(frame0["camera"], "TIFF", save_all=True, append_images=[face]),
        "stereo.jpg": lambda: encode(frame0["colorwheel"], "MPO", save_all=True, append_images=[face]),
    }  # fmt: skip
    multi_frame = []
    for name, build in builds.items():
        (folder / name).write_bytes(build())
        multi_frame.append(folder / name)
    alpha_hidden = folder / "sticker.png"
    clock = photo("clock").convert("RGB").resize(size)
    alpha_hidden.write_bytes(encode(hidden_under_alpha(clock, photo("text")), "PNG"))
    profile = icc_profile()
    icc_jpeg, icc_png = folder / "profile.jpg", folder / "profile.png"
    icc_jpeg.write_bytes(encode(photo("grass").convert("RGB").resize(size), "JPEG", icc_profile=profile))
    icc_png.write_bytes(png_with_icc_name(encode(photo("moon").convert("RGB").resize(size), "PNG"), profile))
    return tuple(multi_frame), alpha_hidden, (icc_jpeg, icc_png)

"""Strip metadata from an image before it is published, leaving its pixels exactly as decoded.

EXIF (GPS, timestamps, camera serials, owner names, embedded thumbnails), XMP, IPTC, comments and text
chunks never reach the safe table. JPEG, PNG and WebP files are rewritten losslessly by walking their
container: metadata segments/chunks are dropped and every byte of pixel data is copied unchanged. Any
other format, and any file whose container cannot be parsed with certainty, is decoded with
:func:`u2s.io.decode.load_rgb` and re-encoded as a lossless PNG of exactly those pixels.

Pixels, not only metadata, decide what else is rewritten (:func:`publishable`, whichever the metadata
policy):

* **One frame, the inspected one.** Unless every frame was inspected (``decode.frames: all``), a
  multi-frame file (APNG, animated WebP or GIF, multi-page TIFF) becomes a lossless PNG of frame 0, the
  frame :func:`~u2s.io.decode.load_rgb` decodes and the VLM inspected (an APNG's default image); an MPO
  keeps its first JPEG image byte for byte and loses the others. A kept APNG or WebP whose frames were
  all inspected keeps its animation, stripped.
* **No hidden colour.** A pixel with alpha 0 keeps no colour: when any has one, the image becomes a
  lossless PNG (RGBA, or LA for grey) with that colour zeroed and every visible pixel unchanged (a WebP
  too: PNG is lossless whatever the source's compression). Its ``convert("RGB")`` is the VLM's view.

What is kept, and why:

* **Orientation**, as a minimal EXIF block holding only the Orientation tag (when it is not 1), so viewers
  and ``ImageOps.exif_transpose`` show the image upright, as u2s decoded and measured it.
* **The ICC colour profile** (JPEG ``APP2 ICC_PROFILE``, PNG ``iCCP``, WebP ``ICCP``), rebuilt by
  :func:`sanitize_icc`: without it wide-gamut images (Display P3 phone photos, Adobe RGB) render with
  wrong colours. Only its colorimetric tags are copied (byte for byte: the colours are unchanged); its
  free-text tags (description, copyright, device maker and model, metadata dictionaries...) are dropped
  or replaced by neutral text, and the header's creation date, creator, device and platform fields are
  cleared. PNG's profile name becomes ``ICC Profile``. A profile that cannot be parsed with certainty is
  dropped, as the re-encode fallback drops every profile.
* **JPEG ``APP14 Adobe``** (cut to its 12 standard bytes): it says whether a CMYK/YCCK or 3-channel image
  is colour-transformed, so decoders give different pixels without it.
* **JFIF ``APP0``** without its thumbnail (density and version only; decoders use its presence to pick
  YCbCr), and PNG's rendering chunks (gamma, chromaticities, sRGB intent, transparency, physical size...).

Everything after the end of the image (JPEG ``EOI``, PNG ``IEND``, the RIFF size of a WebP) is dropped:
MPF (multi-picture) JPEGs append whole extra images there.
"""

from __future__ import annotations

import io
import logging
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from u2s.io.decode import EXTENSIONS, Decoded, decode_image, exif_orientation

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stripped:
    """An image ready to publish."""

    data: bytes
    """The bytes to publish."""
    extension: str
    """Format of ``data``: ``"jpg"``, ``"png"`` or ``"webp"``."""
    removed: bool
    """Whether anything was removed, or the image was re-encoded (``data`` differs from the input)."""


def strip_metadata(data: bytes, *, max_pixels: int | None = None, decoded: Decoded | None = None) -> Stripped:
    """``data`` without metadata; its inspected pixels, as :func:`~u2s.io.decode.load_rgb` decodes them.

    JPEG, PNG and WebP keep their format and pixel data byte for byte; anything else (GIF, TIFF, BMP...)
    and any container that cannot be parsed with certainty becomes a lossless PNG of the decoded, upright
    RGB pixels. A file with frames nobody inspected (frame 0 is, see :class:`~u2s.io.decode.Decoded`) or
    with colour under alpha 0 is re-encoded too (see the module's docstring). ``decoded``: the file's
    :func:`~u2s.io.decode.decode_image` when the caller has it (``decode.frames: all`` sets its
    ``all_frames``; decoded reduced, it is decoded again in full only if the file must be re-encoded),
    else decoded here, bounded by ``max_pixels``. Raises
    :class:`~u2s.io.decode.DecodeError` when ``data`` is not a decodable image.
    """
    if decoded is None:
        decoded = decode_image(data, max_pixels)
    one_frame = decoded.frames == 1 or decoded.all_frames
    for kind, (extension, strip) in _LOSSLESS.items():
        if decoded.hidden or not _MAGIC[kind](data) or not (one_frame or kind == "jpeg"):
            continue
        try:
            out = strip(data, decoded.frames > 1)
            # A JPEG keeps its first image only; anything else that still has several frames must not.
            if not one_frame and _frame_count(out) != 1:
                raise _Doubt("frames left")
        except Exception as e:  # any parse doubt: the re-encode below is always safe
            logger.debug("cannot strip %s losslessly (%s); re-encoding", kind, type(e).__name__)
            break
        return Stripped(out, extension, out != data)
    if decoded.reduced:  # decoded at the thumbnail's size (a JPEG): the PNG needs every pixel
        decoded = decode_image(data, max_pixels)
    return Stripped(_reencode_png(decoded), "png", True)


def publishable(data: bytes, decoded: Decoded, *, strip: bool = True) -> Stripped:
    """The file to publish for ``data``: :func:`strip_metadata`'s, or with ``strip=False``
    (``output.metadata: keep``) ``data`` byte for byte unless its pixels must change (uninspected
    frames, colour under alpha 0), which only a re-encode can do."""
    if strip or decoded.hidden or not (decoded.frames == 1 or decoded.all_frames):
        return strip_metadata(data, decoded=decoded)
    return Stripped(data, EXTENSIONS.get(decoded.format, "img"), False)


# ------------------------------------------------------------------------------------------- shared


class _Doubt(ValueError):
    """The container is not what it should be: re-encode instead."""


def _minimal_exif(orientation: int) -> bytes:
    """``Exif\\0\\0`` + a TIFF block with only the Orientation tag."""
    exif = Image.Exif()
    exif[_ORIENTATION] = orientation
    return exif.tobytes()


_ORIENTATION = 0x0112
_EXIF_HEADER = b"Exif\x00\x00"


def _orientation(img: Image.Image, *, info_complete: bool = False) -> int:
    """The orientation ``load_rgb`` applies to ``img`` (from EXIF, or XMP ``tiff:Orientation``).

    ``info_complete``: every metadata chunk is already in ``img.info`` (a PNG with none after its pixel
    data), so Pillow's base ``getexif`` can read it without the full decode ``PngImageFile`` would run.
    """
    try:
        exif = Image.Image.getexif(img) if info_complete else img.getexif()
        return exif_orientation(exif)
    except Exception:  # load_rgb also leaves an image with unreadable EXIF as stored
        return 1


def _open(data: bytes, formats: tuple[str, ...]) -> Image.Image:
    return Image.open(io.BytesIO(data), formats=formats)


def _frame_count(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as img:
        return getattr(img, "n_frames", 1)


def _reencode_png(decoded: Decoded) -> bytes:
    """A lossless PNG of the inspected frame, upright: with its alpha when it had hidden colour (zeroed
    now), else 8-bit RGB as ``load_rgb`` gives it; nothing but the pixels."""
    img = decoded.transparent if decoded.transparent is not None else decoded.image
    clean = Image.frombytes(img.mode, img.size, img.tobytes())  # no info dict: no ICC, EXIF, text, dpi
    buf = io.BytesIO()
    clean.save(buf, "PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- ICC
# An ICC profile (ICC.1:2022 §7) is a 128-byte header, a tag table and tag data. Colour management reads
# the colorimetric tags only; the text ones (desc, cprt, dmnd, dmdd, meta...) are free text a profile
# editor, a camera or a person wrote. The profile is rebuilt from an allowlist rather than edited in
# place: a tag or type this list does not know (a vendor's private tag) can hold anything.

_ICC_HEADER, _ICC_ENTRY = 128, 12
#: Tags that define colours (device ↔ PCS transforms, primaries, curves, white and black points...).
_ICC_COLOUR_TAGS = frozenset(
    b"A2B0 A2B1 A2B2 A2B3 B2A0 B2A1 B2A2 B2A3 D2B0 D2B1 D2B2 D2B3 B2D0 B2D1 B2D2 B2D3 rXYZ gXYZ bXYZ "
    b"rTRC gTRC bTRC kTRC wtpt bkpt lumi chad chrm clro gamt meas view rig0 tech ciis cicp pre0 pre1 "
    b"pre2".split()
)
#: Numeric tag types (no text inside): XYZ, curves, LUTs, multi-process elements, signatures...
_ICC_NUMERIC_TYPES = frozenset(
    {b"XYZ ", b"curv", b"para", b"mft1", b"mft2", b"mAB ", b"mBA ", b"mpet", b"sf32", b"uf32", b"ui08"}
    | {b"ui16", b"ui32", b"sig ", b"chrm", b"meas", b"view", b"clro", b"cicp"}
)
#: The text that replaces a profile's description and copyright (both are required tags).
ICC_DESCRIPTION, ICC_COPYRIGHT = "ICC profile", "No copyright information"
#: Header fields cleared: creation date and time, primary platform, device manufacturer and model,
#: creator, profile ID (an MD5 of the whole profile; zero means "not computed").
_ICC_CLEARED = ((24, 36), (40, 44), (48, 56), (80, 100))


def _icc_text(signature: bytes, text: str, unicode: bool) -> bytes:
    """Tag data holding ``text``: ``mluc`` (v4) or, in a v2 profile, ``desc`` / ``text``."""
    if unicode:
        encoded = text.encode("utf-16-be")
        return b"mluc" + struct.pack(">III2s2sII", 0, 1, 12, b"en", b"US", len(encoded), 28) + encoded
    ascii_text = text.encode("ascii") + b"\x00"
    if signature == b"desc":  # textDescriptionType: ASCII, an empty Unicode and an empty ScriptCode part
        return b"desc" + struct.pack(">II", 0, len(ascii_text)) + ascii_text + b"\x00" * (8 + 3 + 67)
    return b"text" + b"\x00" * 4 + ascii_text


def sanitize_icc(profile: bytes) -> bytes | None:
    """``profile`` with its colorimetric tags byte for byte and nothing free-form: a neutral description
    and copyright, no other text, no creation date, creator or device. None when it is not a profile
    this can parse with certainty (the caller drops it)."""
    if len(profile) < _ICC_HEADER + 4 or profile[36:40] != b"acsp":
        return None
    size = struct.unpack_from(">I", profile, 0)[0]
    count = struct.unpack_from(">I", profile, _ICC_HEADER)[0]
    table_end = _ICC_HEADER + 4 + _ICC_ENTRY * count
    if not table_end <= size <= len(profile):
        return None
    unicode = profile[8] >= 4
    kept: list[tuple[bytes, int, int]] = []
    for index in range(count):
        signature, offset, length = struct.unpack_from(">4sII", profile, _ICC_HEADER + 4 + _ICC_ENTRY * index)
        if offset < table_end or length < 8 or offset + length > size:
            return None
        kind = profile[offset : offset + 4]
        if signature == b"desc" and kind in (b"mluc", b"desc"):  # write the type the profile used
            unicode = kind == b"mluc"
        elif signature in _ICC_COLOUR_TAGS and kind in _ICC_NUMERIC_TYPES:
            kept.append((signature, offset, length))
    tags = [(sig, profile[offset : offset + length]) for sig, offset, length in kept]
    tags += [(b"desc", _icc_text(b"desc", ICC_DESCRIPTION, unicode)),
             (b"cprt", _icc_text(b"cprt", ICC_COPYRIGHT, unicode))]  # fmt: skip
    header = bytearray(profile[:_ICC_HEADER])
    for start, stop in _ICC_CLEARED:
        header[start:stop] = bytes(stop - start)
    table, body, placed = [], bytearray(), {}
    data_start = _ICC_HEADER + 4 + _ICC_ENTRY * len(tags)
    for signature, data in tags:  # tags that shared their data (rTRC = gTRC = bTRC) still do
        if data not in placed:
            body += b"\x00" * (-len(body) % 4)
            placed[data] = data_start + len(body)
            body += data
        table.append(struct.pack(">4sII", signature, placed[data], len(data)))
    body += b"\x00" * (-len(body) % 4)
    out = header + struct.pack(">I", len(tags)) + b"".join(table) + body
    out[0:4] = struct.pack(">I", len(out))
    return bytes(out)


# --------------------------------------------------------------------------------------------- JPEG
# Pillow cannot write a JPEG without re-encoding its pixels (lossy), and no maintained Python library
# drops segments losslessly while keeping the ICC profile and APP14 (piexif only removes APP1), so the
# marker walk is written here (ITU T.81 §B.1).

_SOI, _EOI, _SOS = 0xD8, 0xD9, 0xDA
_APP0, _APP1, _APP2, _APP14, _APP15, _COM = 0xE0, 0xE1, 0xE2, 0xEE, 0xEF, 0xFE
#: Segments that define the image: SOF0-15 (not C8, reserved), DHT (C4), DAC (CC), DQT, DNL, DRI, DHP, EXP.
_JPEG_STRUCTURE = frozenset({*range(0xC0, 0xC8), *range(0xC9, 0xD0), 0xDB, 0xDC, 0xDD, 0xDE, 0xDF})
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
#: The next marker after entropy-coded data: 0xFF followed by anything but a stuffed 0x00, RST0-7 or fill.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JFIF, _JFIF_LEN = b"JFIF\x00", 14  # identifier, version(2), units, densities(2+2), thumbnail w, h
_ADOBE, _ADOBE_LEN = b"Adobe", 12  # identifier, version(2), flags0(2), flags1(2), transform


def _segment(marker: int, payload: bytes) -> bytes:
    if len(payload) + 2 > 0xFFFF:
        raise _Doubt("segment too long")
    return bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload


def _jpeg_keep(marker: int, payload: bytes) -> bytes | None:
    """The payload to keep of a non-scan segment, or None to drop it."""
    if marker in _JPEG_STRUCTURE:
        return payload
    if marker == _APP0:  # JFIF keeps density and version, loses its thumbnail; JFXX (thumbnails) goes
        if not payload.startswith(_JFIF):
            return None
        if len(payload) < _JFIF_LEN:
            raise _Doubt("short JFIF segment")
        return payload[: _JFIF_LEN - 2] + b"\x00\x00"
    if marker == _APP2:  # ICC profile chunks are rebuilt by _strip_jpeg; MPF and FlashPix go
        return None
    if marker == _APP14:  # Adobe colour transform stays, cut to its standard length
        return payload[:_ADOBE_LEN] if payload.startswith(_ADOBE) and len(payload) >= _ADOBE_LEN else None
    if _APP0 <= marker <= _APP15 or marker == _COM:  # EXIF, XMP, IPTC/Photoshop, Ducky, comments...
        return None
    raise _Doubt(f"unexpected marker 0x{marker:02X}")


_ICC_JPEG = b"ICC_PROFILE\x00"
_ICC_JPEG_CHUNK = 0xFFFF - 2 - len(_ICC_JPEG) - 2  # a segment's payload after its header and numbers


def _jpeg_icc(chunks: list[bytes]) -> list[bytes]:
    """The APP2 segments of the sanitized profile the ``ICC_PROFILE`` payloads carry, or none."""
    numbered = sorted(chunks, key=lambda chunk: chunk[len(_ICC_JPEG)])
    n = len(numbered)
    if [c[len(_ICC_JPEG)] for c in numbered] != list(range(1, n + 1)) or {c[13] for c in numbered} != {n}:
        return []  # not one complete profile: drop it
    profile = sanitize_icc(b"".join(chunk[len(_ICC_JPEG) + 2 :] for chunk in numbered))
    if profile is None:
        return []
    parts = [profile[i : i + _ICC_JPEG_CHUNK] for i in range(0, len(profile), _ICC_JPEG_CHUNK)]
    return [_segment(_APP2, _ICC_JPEG + bytes((i + 1, len(parts))) + p) for i, p in enumerate(parts)]


def _strip_jpeg(data: bytes, animation: bool = False) -> bytes:
    """(``animation`` is unused: a JPEG keeps its first image only.)"""
    out: list[bytes] = [b"\xff\xd8"]
    icc: list[bytes] = []
    icc_at = None
    pos, end, frames, scans = 2, len(data), 0, 0
    while True:
        if pos >= end or data[pos] != 0xFF:
            raise _Doubt("no marker where one must be")
        while pos < end and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= end:
            raise _Doubt("truncated")
        marker = data[pos]
        pos += 1
        if marker == _EOI:
            break  # anything after EOI (MPF's extra images, trailers) is dropped
        if pos + 2 > end:
            raise _Doubt("truncated")
        length = struct.unpack_from(">H", data, pos)[0]
        if length < 2 or pos + length > end:
            raise _Doubt("bad segment length")
        payload = data[pos + 2 : pos + length]
        pos += length
        if marker == _SOS:
            found = _NEXT_MARKER.search(data, pos)
            if found is None:
                raise _Doubt("scan without an end")
            out.append(_segment(marker, payload) + data[pos : found.start()])
            pos, scans = found.start(), scans + 1
            continue
        frames += marker in _SOF
        if marker == _APP2 and payload.startswith(_ICC_JPEG) and len(payload) > len(_ICC_JPEG) + 2:
            icc_at = len(out) if icc_at is None else icc_at
            icc.append(payload)
            continue
        kept = _jpeg_keep(marker, payload)
        if kept is not None:
            out.append(_segment(marker, kept))
    if not frames or not scans:
        raise _Doubt("no frame or no scan")
    if icc_at is not None:
        out[icc_at:icc_at] = _jpeg_icc(icc)
    orientation = _orientation(_open(data, ("JPEG", "MPO")))
    if orientation != 1:  # after SOI and a leading JFIF segment, where readers look for EXIF
        at = 2 if len(out) > 1 and out[1][1] == _APP0 and out[1][4:9] == _JFIF else 1
        out.insert(at, _segment(_APP1, _minimal_exif(orientation)))
    return b"".join([*out, b"\xff\xd9"])


# ---------------------------------------------------------------------------------------------- PNG
# Pillow re-encodes when saving a PNG (different zlib stream, and it drops APNG frames), so the chunks
# are copied here instead; a chunk is self-delimiting with a CRC (PNG spec §5.3), so this is short.

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Critical chunks, rendering chunks (colour, transparency, physical size, HDR) and APNG's frames.
_PNG_KEEP = frozenset(
    {b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"sBIT", b"bKGD"}
    | {b"pHYs", b"cICP", b"mDCv", b"cLLi", b"acTL", b"fcTL", b"fdAT"}
)
_PNG_PIXELS = frozenset({b"IDAT", b"IEND", b"fcTL", b"fdAT"})


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """``(type, whole chunk bytes)`` up to IEND, CRCs checked."""
    chunks, pos, end = [], len(_PNG_SIGNATURE), len(data)
    while True:
        if pos + 12 > end:
            raise _Doubt("truncated")
        length, kind = struct.unpack_from(">I4s", data, pos)
        stop = pos + 12 + length
        if stop > end or not kind.isalpha():
            raise _Doubt("bad chunk")
        if zlib.crc32(data[pos + 4 : stop - 4]) != struct.unpack_from(">I", data, stop - 4)[0]:
            raise _Doubt("bad CRC")
        chunks.append((kind, data[pos:stop]))
        pos = stop
        if kind == b"IEND":
            return chunks


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


_APNG = frozenset({b"acTL", b"fcTL", b"fdAT"})
_ICC_PNG_NAME = b"ICC Profile"  # what Pillow writes: the name is free text (often the profile's description)
_ICC_MAX = 64 * 2**20


def _png_icc(body: bytes) -> bytes | None:
    """An ``iCCP`` chunk of the sanitized profile, with a neutral name; None to drop it."""
    name_end = body.find(b"\x00")
    if not 1 <= name_end <= 79 or body[name_end + 1 : name_end + 2] != b"\x00":
        return None
    inflate = zlib.decompressobj()
    try:
        profile = inflate.decompress(body[name_end + 2 :], _ICC_MAX)
    except zlib.error:
        return None
    if not inflate.eof or inflate.unconsumed_tail or (profile := sanitize_icc(profile)) is None:
        return None
    return _png_chunk(b"iCCP", _ICC_PNG_NAME + b"\x00\x00" + zlib.compress(profile, 9))


def _strip_png(data: bytes, animation: bool = False) -> bytes:
    """``animation``: keep APNG's frames (all inspected); else a still image, as Pillow decodes it."""
    chunks = _png_chunks(data)
    kinds = [kind for kind, _ in chunks]
    if kinds[0] != b"IHDR" or b"IDAT" not in kinds:
        raise _Doubt("no IHDR or no IDAT")
    unknown_critical = [k for k in kinds if k not in _PNG_KEEP and k[:1].isupper()]
    if unknown_critical:
        raise _Doubt("unknown critical chunk")
    first_idat = kinds.index(b"IDAT")
    info_complete = all(kind in _PNG_PIXELS for kind in kinds[first_idat:])
    orientation = _orientation(_open(data, ("PNG",)), info_complete=info_complete)
    out = [_PNG_SIGNATURE]
    for index, (kind, chunk) in enumerate(chunks):
        if index == first_idat and orientation != 1:  # eXIf must precede the image data
            out.append(_png_chunk(b"eXIf", _minimal_exif(orientation)[len(_EXIF_HEADER) :]))
        if kind == b"iCCP":
            icc = _png_icc(chunk[8:-4])
            out += [icc] if icc is not None else []
        elif kind in _PNG_KEEP and (animation or kind not in _APNG):
            out.append(chunk)
    return b"".join(out)


# --------------------------------------------------------------------------------------------- WebP
# Pillow re-encodes when saving a WebP (lossy ones lose quality), so the RIFF chunks are copied here
# (https://developers.google.com/speed/webp/docs/riff_container).

_VP8X_ICC, _VP8X_ALPHA, _VP8X_EXIF, _VP8X_XMP, _VP8X_ANIMATION = 0x20, 0x10, 0x08, 0x04, 0x02
_WEBP_BITSTREAM = frozenset({b"VP8 ", b"VP8L"})
_WEBP_KEEP = frozenset({b"VP8X", b"ICCP", b"ANIM", b"ANMF", b"ALPH"}) | _WEBP_BITSTREAM
_ANMF_HEADER = 16  # X, Y (3+3), width, height (3+3), duration (3), flags (1)


def _riff_chunks(data: bytes, pos: int, end: int) -> list[tuple[bytes, bytes]]:
    """``(fourcc, payload)`` of the RIFF chunks in ``data[pos:end]``."""
    chunks = []
    while pos < end:
        if pos + 8 > end:
            raise _Doubt("truncated")
        fourcc, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        stop = pos + 8 + size
        if stop > end:
            raise _Doubt("bad chunk size")
        chunks.append((fourcc, data[pos + 8 : stop]))
        pos = stop + (size & 1)  # chunks are padded to an even size
    return chunks


def _riff_chunk(fourcc: bytes, payload: bytes) -> bytes:
    return fourcc + struct.pack("<I", len(payload)) + payload + b"\x00" * (len(payload) & 1)


def _strip_webp(data: bytes, animation: bool = False) -> bytes:
    """(``animation`` is unused: a WebP whose frames were not all inspected is never stripped.)"""
    end = 8 + struct.unpack_from("<I", data, 4)[0]
    if end > len(data):
        raise _Doubt("truncated")
    chunks = _riff_chunks(data, 12, end)
    if not chunks:
        raise _Doubt("no chunks")
    if chunks[0][0] in _WEBP_BITSTREAM:  # simple format: a bitstream and nothing else, no metadata
        if len(chunks) != 1:
            raise _Doubt("extra chunks in a simple WebP")
        body = [_riff_chunk(*chunks[0])]
    else:
        if chunks[0][0] != b"VP8X" or len(chunks[0][1]) != 10:
            raise _Doubt("no VP8X header")
        body = []
        for fourcc, payload in chunks[1:]:
            if fourcc == b"ANMF":  # a frame: its header, then its alpha and bitstream sub-chunks only
                if len(payload) < _ANMF_HEADER:
                    raise _Doubt("short frame")
                frame = _riff_chunks(payload, _ANMF_HEADER, len(payload))
                kept = (_riff_chunk(k, p) for k, p in frame if k in _WEBP_KEEP)
                payload = payload[:_ANMF_HEADER] + b"".join(kept)
            if fourcc == b"ICCP":
                payload = sanitize_icc(payload)
                if payload is None:
                    continue
            if fourcc in _WEBP_KEEP - {b"VP8X"}:
                body.append(_riff_chunk(fourcc, payload))
        orientation = _orientation(_open(data, ("WEBP",)))
        flags = chunks[0][1][0] & ~(_VP8X_EXIF | _VP8X_XMP | _VP8X_ICC)
        if any(chunk.startswith(b"ICCP") for chunk in body):
            flags |= _VP8X_ICC
        if orientation != 1:  # EXIF comes after the image data
            body.append(_riff_chunk(b"EXIF", _minimal_exif(orientation)[len(_EXIF_HEADER) :]))
            flags |= _VP8X_EXIF
        body.insert(0, _riff_chunk(b"VP8X", bytes((flags,)) + chunks[0][1][1:]))
    payload = b"WEBP" + b"".join(body)
    return b"RIFF" + struct.pack("<I", len(payload)) + payload


_MAGIC: dict[str, Callable[[bytes], bool]] = {
    "jpeg": lambda data: data.startswith(b"\xff\xd8\xff"),
    "png": lambda data: data.startswith(_PNG_SIGNATURE),
    "webp": lambda data: len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP",
}
_LOSSLESS: dict[str, tuple[str, Callable[[bytes, bool], bytes]]] = {
    "jpeg": ("jpg", _strip_jpeg),
    "png": ("png", _strip_png),
    "webp": ("webp", _strip_webp),
}

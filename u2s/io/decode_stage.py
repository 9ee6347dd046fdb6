"""The pipeline's decode stage: each row's image validated once, its thumbnails, its publishable file."""

from __future__ import annotations

from typing import TYPE_CHECKING

from u2s.io.decode import Decoded, DecodeError, decode_image, later_frames, thumbnail, thumbnail_size
from u2s.io.metadata import publishable
from u2s.schema import mark_error
from u2s.stage import Stage

if TYPE_CHECKING:
    from u2s.config import DecodeConfig


class DecodeStage(Stage):
    """Validate each row's image with one decode; bad rows get ``decode`` errors.

    A JPEG is decoded straight to its VLM thumbnail at a reduced DCT scale (every byte of it is still
    decoded, so a corrupt file fails here), every other format in full.

    For every image that decodes it records the upright size and the number of frames, writes the VLM
    thumbnail of frame 0 (stage 1 never touches the full-size bytes again) and, with ``decode.frames:
    all``, one thumbnail per later frame (``frame_thumbnails``; a file with more than ``max_frames``
    frames fails). It replaces the bytes with the publishable file
    (:func:`u2s.io.metadata.publishable`), named ``{id}.{ext}`` (never the source path): with
    ``metadata="strip"`` the same pixels without metadata; with either policy, a multi-frame file
    whose later frames were not inspected becomes frame 0 alone, and colour under alpha 0 is zeroed.
    """

    name = "decode"
    reads = ("image",)
    writes = ("image", "width", "height", "thumbnail", "frame_thumbnails", "frames", "metadata_removed")

    def __init__(self, decode: DecodeConfig, thumbnail_side: int, metadata: str = "strip") -> None:
        self.config = decode
        self.thumbnail_side = thumbnail_side
        self.metadata = metadata

    def check(self, data: bytes | None) -> Decoded:
        """Frame 0 of ``data`` decoded; raises :class:`DecodeError` when it breaks a limit."""
        if data is None:
            raise DecodeError("no image bytes")
        if len(data) > self.config.max_bytes:
            raise DecodeError(
                f"file too large: {len(data)} bytes exceeds the {self.config.max_bytes}-byte limit"
            )
        return decode_image(data, self.config.max_pixels, size=thumbnail_size(self.thumbnail_side))

    def frame_thumbnails(self, data: bytes, decoded: Decoded) -> list[bytes]:
        """Thumbnails of frames 1.. (``decode.frames: all``); marks ``decoded`` as wholly inspected."""
        if decoded.frames > self.config.max_frames:
            raise DecodeError(
                f"too many frames: {decoded.frames} exceeds the {self.config.max_frames}-frame limit"
            )
        thumbnails = []
        for rgb, hidden in later_frames(data, decoded.frames, self.config.max_pixels):
            thumbnails.append(thumbnail(rgb, self.thumbnail_side))
            decoded.hidden |= hidden
        decoded.all_frames = True
        return thumbnails

    def process(self, rows: list[dict]) -> None:
        for row in rows:
            data = (row["image"] or {}).get("bytes")
            try:
                decoded = self.check(data)
                others = None
                if self.config.frames == "all" and decoded.frames > 1:
                    others = self.frame_thumbnails(data, decoded)
                # Metadata goes without decoding (JPEG, PNG, WebP); a re-encode reuses the decoded pixels.
                published = publishable(data, decoded, strip=self.metadata == "strip")
            except DecodeError as e:
                mark_error(row, self.name, str(e))
                continue
            row["width"], row["height"] = decoded.size
            row["frames"] = decoded.frames
            row["thumbnail"] = thumbnail(decoded.image, self.thumbnail_side)
            row["frame_thumbnails"] = others
            row["metadata_removed"] = published.removed
            decoded.close()
            row["image"] = {"bytes": published.data, "path": f"{row['id']}.{published.extension}"}

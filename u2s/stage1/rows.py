"""Row helpers shared by the stage-1 stages: thumbnails with per-row errors, every frame inspected,
sampling seeds."""

from __future__ import annotations

import hashlib
import io
from typing import TYPE_CHECKING

from PIL import Image

from u2s.schema import mark_error

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from PIL.Image import Image as PILImage


def load_thumbnails(rows: list[dict], stage: str) -> tuple[list[dict], list[PILImage]]:
    """Each row's VLM thumbnail (written once by decode); rows without one fail here.

    Returns (rows that have an image, their images).
    """
    ready, images = [], []
    for row in rows:
        data = row.get("thumbnail")
        if not data:
            mark_error(row, stage, "image: no thumbnail")
            continue
        try:
            with Image.open(io.BytesIO(data)) as img:
                images.append(img.convert("RGB"))
        except Exception as e:  # decode wrote it, so this is a bug or corruption in transit
            mark_error(row, stage, f"image: unreadable thumbnail ({type(e).__name__})")
            continue
        ready.append(row)
    return ready, images


def inspect_frames(rows: list[dict], inspect: Callable[[list[dict]], None], writes: tuple[str, ...]) -> None:
    """Run the inspect call ``inspect`` on every frame of ``rows`` (``decode.frames: all``): one request
    per frame, each frame a copy of its row with that frame's thumbnail (frame 0: ``thumbnail``; frame
    i: ``frame_thumbnails[i-1]``, id ``{id}#frame{i}`` so each frame gets its own sampling seed).

    A row is flagged when any frame is: it takes the ``writes`` of its first flagged frame (frame 0's
    when none is), the categories every frame named, and ``flagged_frame``. A frame the model could
    not answer fails the row: a frame that was not inspected is never published.
    """
    frames = []
    for row in rows:
        thumbnails = [row["thumbnail"], *(row.get("frame_thumbnails") or [])]
        copies = [dict(row, thumbnail=t, frame_thumbnails=None) for t in thumbnails]
        for index, copy in enumerate(copies[1:], start=1):
            copy["id"] = f"{row['id']}#frame{index}"
        frames.append(copies)
    inspect([copy for copies in frames for copy in copies])
    for row, copies in zip(rows, frames, strict=True):
        failed = next((copy for copy in copies if copy["status"] == "error"), None)
        if failed is not None:
            row.update(status=failed["status"], error=failed["error"])
            continue
        flagged = [index for index, copy in enumerate(copies) if copy["privacy_flag"]]
        chosen = copies[flagged[0]] if flagged else copies[0]
        row.update({name: chosen[name] for name in (*writes, "status") if name != "flagged_frame"})
        named = [c for copy in copies for c in copy.get("categories") or []]
        row["categories"] = list(dict.fromkeys(named))
        row["flagged_frame"] = flagged[0] if flagged else None


def sampling_seeds(keys: Iterable[str]) -> list[int]:
    """A 63-bit sampling seed per key (a row's id, or id and question): a row retries the same way
    whichever rows share its batch, in any run."""
    return [int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") & (2**63 - 1) for key in keys]

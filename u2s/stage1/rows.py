"""Row helpers shared by the stage-1 stages: thumbnails with per-row errors, sampling seeds."""

from __future__ import annotations

import hashlib
import io
from typing import TYPE_CHECKING

from PIL import Image

from u2s.schema import mark_error

if TYPE_CHECKING:
    from collections.abc import Iterable

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


def sampling_seeds(keys: Iterable[str]) -> list[int]:
    """A 63-bit sampling seed per key (a row's id, or id and question): a row retries the same way
    whichever rows share its batch, in any run."""
    return [int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") & (2**63 - 1) for key in keys]

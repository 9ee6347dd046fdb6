"""Row helpers shared by the stage-1 stages: image loading with per-row errors, batch seeds."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from u2s.io.decode import DecodeError, load_rgb
from u2s.schema import mark_error

if TYPE_CHECKING:
    from PIL import Image


def load_images(rows: list[dict], stage: str) -> tuple[list[dict], list[Image.Image]]:
    """Decode each row's image; rows that fail get status=error. Returns (loadable rows, their images)."""
    ready, images = [], []
    for row in rows:
        data = (row.get("image") or {}).get("bytes")
        try:
            images.append(load_rgb(data))
        except DecodeError as e:
            mark_error(row, stage, f"image: {e}")
            continue
        ready.append(row)
    return ready, images


def batch_seed(rows: list[dict]) -> int:
    """A 63-bit seed from the rows' ids (the same batch always retries the same way)."""
    digest = hashlib.sha256("\n".join(str(row["id"]) for row in rows).encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)

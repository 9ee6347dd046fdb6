"""Stage 2: rewrite flagged rows with the configured editor; every other row passes untouched.

Rows are bucketed by working size (an aspect-preserving size whose sides are multiples of 64), so one
editor call sees images of a single size; each row is seeded from the base seed and its id, so a rerun
reproduces its output whatever batch it lands in; the edited image is restored to the row's original
size before encoding. Editors with ``native_size`` (the baselines) skip both resizes: rows are bucketed
by their own size and the output is encoded as returned.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections import defaultdict
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from u2s.io.decode import DecodeError, load_rgb
from u2s.schema import Status, mark_error
from u2s.stage import Stage, flagged
from u2s.stage2.editors import load_editor
from u2s.stage2.editors.base import EditPrompt

if TYPE_CHECKING:
    from u2s.config import Stage2Config

logger = logging.getLogger(__name__)

#: Side lengths of working sizes are multiples of this.
SIZE_MULTIPLE = 64

_EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}


def row_seed(base_seed: int, row_id: str) -> int:
    """A row's 63-bit seed: sha256 of the base seed and the row id (stable across processes and runs)."""
    digest = hashlib.sha256(f"{base_seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def _round64(x: float) -> int:
    return max(SIZE_MULTIPLE, int(x / SIZE_MULTIPLE + 0.5) * SIZE_MULTIPLE)


def working_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The (width, height) an image of this size is edited at.

    The long side becomes ``resolution`` and the short side keeps the aspect ratio; each side is then
    rounded to the nearest multiple of 64 (at least 64). Latent-diffusion editors need sides divisible
    by the VAE's downsampling (8) times the UNet's (up to 8), and coarse rounding also leaves few
    distinct sizes, so rows fall into few buckets and batches stay full.
    """
    if width < 1 or height < 1:
        raise ValueError(f"invalid image size {width}x{height}")
    long_side = max(width, height)
    return _round64(width * resolution / long_side), _round64(height * resolution / long_side)


def encode_image(img: Image.Image, fmt: str) -> tuple[bytes, str]:
    """Encode ``img`` as PNG, JPEG (quality 95) or WEBP (quality 95); returns (bytes, file extension)."""
    buf = io.BytesIO()
    if fmt == "PNG":
        img.save(buf, format="PNG")
    elif fmt in ("JPEG", "WEBP"):
        img.save(buf, format=fmt, quality=95)
    else:
        raise ValueError(f"unsupported output format {fmt!r}")
    return buf.getvalue(), _EXTENSIONS[fmt]


def edit_prompt(row: dict) -> EditPrompt:
    """The stage-1 texts of a working row, as editors take them."""
    return EditPrompt(
        edit_instruction=row["edit_instruction"] or "",
        public_caption=row["public_caption"] or "",
        private_caption=row["private_caption"] or "",
        combined_caption=row.get("combined_caption"),
    )


class EditStage(Stage):
    """Runs the stage-2 editor on flagged rows that have an edit instruction."""

    name = "edit"
    reads = ("image", "width", "height", "edit_instruction", "public_caption", "private_caption",
             "combined_caption")  # fmt: skip
    writes = ("image", "width", "height", "editor", "seed")

    def __init__(self, stage2: Stage2Config) -> None:
        from u2s.torch_utils import set_threads

        self.config = stage2
        set_threads(stage2.resources.threads())
        self.editor = load_editor(stage2)

    def wanted(self, batch: pa.Table) -> pa.ChunkedArray:
        return pc.and_(flagged(batch), pc.is_valid(batch.column("edit_instruction")))

    def process(self, rows: list[dict]) -> None:
        cfg = self.config
        # Decode one row at a time and keep only its working-size copy: memory stays bounded by one
        # full-size image plus the batch at working size (native-size editors hold the batch at full size).
        buckets: dict[tuple[int, int], list[tuple[dict, Image.Image, tuple[int, int]]]] = defaultdict(list)
        for row in rows:
            try:
                img = load_rgb((row["image"] or {}).get("bytes") or b"")
            except DecodeError as e:
                mark_error(row, self.name, str(e))
                continue
            original = (row["width"] or img.width, row["height"] or img.height)
            if self.editor.native_size:  # edited at its own size: no resampling on the way in or out
                buckets[img.size].append((row, img, original))
            else:
                size = working_size(img.width, img.height, cfg.resolution)
                buckets[size].append((row, img.resize(size, Image.Resampling.LANCZOS), original))
            del img

        step = cfg.resources.batch_size
        for size in sorted(buckets):
            items = buckets[size]
            for start in range(0, len(items), step):
                self._edit_chunk(items[start : start + step])

    def _edit_chunk(self, items: list[tuple[dict, Image.Image, tuple[int, int]]]) -> None:
        cfg = self.config
        rows = [row for row, _, _ in items]
        seeds = [row_seed(cfg.seed, row["id"]) for row in rows]
        try:
            outputs = self.editor.edit(
                [img for _, img, _ in items], [edit_prompt(row) for row in rows], seeds
            )
            if len(outputs) != len(rows):
                raise RuntimeError("editor returned a wrong number of images")
        except Exception as e:  # fail this chunk only; the message may quote private text, so drop it
            logger.error("editor %s failed on %d rows: %s", self.editor.name, len(rows), type(e).__name__)
            for row in rows:
                mark_error(row, self.name, f"editor failed ({type(e).__name__})")
            return
        for (row, _, original), out, seed in zip(items, outputs, seeds, strict=True):
            if out.size != original:
                out = out.resize(original, Image.Resampling.LANCZOS)
            data, ext = encode_image(out.convert("RGB"), cfg.output_format)
            row["image"] = {"bytes": data, "path": f"{row['id']}.{ext}"}
            row["width"], row["height"] = original
            row["status"] = Status.EDITED.value
            row["editor"] = self.editor.name
            row["seed"] = seed

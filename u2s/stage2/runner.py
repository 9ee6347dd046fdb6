"""Stage 2: rewrite flagged rows with the configured editor; every other row passes untouched.

Each image is resized to the size its editor edits it at (:meth:`~u2s.stage2.editors.base.Editor.bucket_size`:
the IP2P family at ``resolution``, at the nearest of ``stage2.aspect_buckets``' ratios when set; FlowEdit
near native size; the baselines at their own size) and rows are bucketed by that size, so one editor call
sees images of a single size; each row is seeded from the base seed and its id, so a rerun reproduces its
output whatever batch it lands in; the edited image is restored to the row's original size before
encoding. An output whose pixels equal the editor's input is never published: that row becomes an error
row.

Full editor calls. The edit pool's Ray batch (``stage2.resources.batch_size`` rows) holds mostly
pass-through rows; an editor call holds up to ``stage2.max_batch`` flagged images of one size. A Ray
batch's output must be returned for that batch, so flagged rows cannot wait in the actor for the next
batch's; every Ray batch therefore ends with at most one partial call per size, and calls are full when
that remainder is small against the flagged rows per size: the Ray batch is sized from the flag rate
(:func:`mean_call_size`; ``u2s plan`` prints it) and, for fixed-resolution editors, aspect-ratio buckets
cut the number of sizes (COCO: a landscape and a portrait bucket hold nearly every image). Native-size
editors (FlowEdit, the baselines) batch only images of one size, so on mixed sizes most of their calls
hold one image. A size depends on its image alone (never on batch-mates), so no output does either.

Under ``stage2.verify`` the stage runs once per edit attempt (``attempt``: the ladder's rung, a new seed):
it edits the rows whose previous attempt failed verification, and its output waits in ``candidate``
(``image`` keeps the original, status stays null) for :class:`~u2s.stage2.verify.VerifyStage`, which
publishes it or sends the row to the next attempt. An unchanged output is then a failed attempt.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
from collections import defaultdict
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from u2s.healing import OutOfMemory, classify, split_on_oom
from u2s.io.decode import DecodeError, decode_image
from u2s.schema import Status, mark_error
from u2s.stage import Stage, flagged
from u2s.stage2.editors import load_editor
from u2s.stage2.editors.base import EditPrompt
from u2s.stage2.verify import record_attempt

if TYPE_CHECKING:
    from u2s.config import Stage2Config, StorageConfig

logger = logging.getLogger(__name__)

_EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}

#: The error reason of a row whose editor output equals its input (content-free).
UNCHANGED = "editor left the image unchanged"


def row_seed(base_seed: int, row_id: str) -> int:
    """A row's 63-bit seed: sha256 of the base seed and the row id (stable across processes and runs)."""
    digest = hashlib.sha256(f"{base_seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def attempt_seed(base_seed: int, row_id: str, attempt: int = 1) -> int:
    """The seed of a row's edit attempt: :func:`row_seed` for the first, a new one for each re-edit."""
    return row_seed(base_seed, row_id if attempt == 1 else f"{row_id}#{attempt}")


def mean_call_size(rows: int, flag_rate: float, max_batch: int, shares: tuple[float, ...] = (1.0,)) -> float:
    """Expected images per editor call when Ray batches of ``rows`` rows, each flagged with probability
    ``flag_rate``, fall into working sizes with probabilities ``shares``, in calls of up to ``max_batch``.

    Per Ray batch a size's flagged count is binomial and takes ceil(count / max_batch) calls; the mean is
    expected images over expected calls (what a long run averages). Divide by ``max_batch`` for the fill.
    """
    images = calls = 0.0
    for share in shares:
        p = min(max(flag_rate * share, 0.0), 1.0)
        if p == 0.0:
            continue
        if p == 1.0:
            calls += math.ceil(rows / max_batch)
        else:  # E[ceil(N / max_batch)], N ~ Binomial(rows, p), from the log pmf
            log_p, log_q = math.log(p), math.log1p(-p)
            for n in range(1, rows + 1):
                log_pmf = math.lgamma(rows + 1) - math.lgamma(n + 1) - math.lgamma(rows - n + 1)
                calls += math.ceil(n / max_batch) * math.exp(log_pmf + n * log_p + (rows - n) * log_q)
        images += rows * p
    return images / calls if calls else 0.0


def rows_for_fill(
    flag_rate: float, max_batch: int, shares: tuple[float, ...] = (1.0,), fill: float = 0.9
) -> int:
    """The smallest Ray batch (rows, a multiple of 64) whose calls are ``fill`` full on average
    (:func:`mean_call_size`); fill grows with the Ray batch, so a doubling then a bisection find it."""
    full = lambda rows: mean_call_size(rows, flag_rate, max_batch, shares) >= fill * max_batch  # noqa: E731
    high = 64
    while not full(high) and high < 2**16:
        high *= 2
    low = high // 2
    while high - low > 64:
        mid = (low + high) // 128 * 64
        low, high = (low, mid) if full(mid) else (mid, high)
    return high


#: Save options per output format (chosen from bench/encode.py's figures, docs/benchmarks.md): JPEG at
#: quality 95; lossless WEBP at its fastest effort (smaller than PNG, and 2-3x faster to encode).
_SAVE_OPTIONS = {"JPEG": {"quality": 95}, "PNG": {}, "WEBP": {"lossless": True, "quality": 0, "method": 0}}


def encode_image(img: Image.Image, fmt: str) -> tuple[bytes, str]:
    """Encode ``img`` as JPEG (quality 95), PNG or lossless WEBP; returns (bytes, file extension)."""
    if fmt not in _SAVE_OPTIONS:
        raise ValueError(f"unsupported output format {fmt!r}")
    buf = io.BytesIO()
    img.save(buf, format=fmt, **_SAVE_OPTIONS[fmt])
    return buf.getvalue(), _EXTENSIONS[fmt]


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    """Whether two images have the same size and the same RGB pixel values."""
    rgb = lambda img: img if img.mode == "RGB" else img.convert("RGB")  # noqa: E731
    return a.size == b.size and rgb(a).tobytes() == rgb(b).tobytes()


def edit_prompt(row: dict) -> EditPrompt:
    """The stage-1 texts of a working row, as editors take them."""
    return EditPrompt(
        edit_instruction=row["edit_instruction"] or "",
        public_caption=row["public_caption"] or "",
        private_caption=row["private_caption"] or "",
        combined_caption=row.get("combined_caption"),
    )


#: One row on its way through the editor: the row, its image at working size, its original size.
_Item = tuple[dict, Image.Image, tuple[int, int]]


class EditStage(Stage):
    """Runs the stage-2 editor on flagged rows that have an edit instruction."""

    name = "edit"
    reads = ("image", "width", "height", "edit_instruction", "public_caption", "private_caption",
             "combined_caption", "verify_attempts", "verify")  # fmt: skip
    writes = ("image", "width", "height", "editor", "seed", "candidate", "verify_attempts", "verify")

    def __init__(self, stage2: Stage2Config, storage: StorageConfig | None = None, attempt: int = 1) -> None:
        """``storage``: endpoint and model cache of s3:// models (staged here, on the worker); ``attempt``:
        which edit attempt under ``stage2.verify`` (its ladder rung: editor, settings, pool)."""
        from u2s.torch_utils import set_threads

        self.attempt = attempt
        self.verifying = stage2.verify.enabled
        self.config = stage2 = stage2.attempt(attempt)
        set_threads(stage2.resources.threads())
        self.editor = load_editor(stage2, storage)
        #: Encoding of edited images: the config's, or under ``auto`` the editor's own.
        self.output_format = (
            self.editor.output_format if stage2.output_format == "auto" else stage2.output_format
        )

    def wanted(self, batch: pa.Table) -> pa.ChunkedArray:
        """Flagged rows with an instruction; a re-edit: only rows whose previous attempt failed (verified,
        so no candidate waits)."""
        rows = pc.and_(flagged(batch), pc.is_valid(batch.column("edit_instruction")))
        attempts = batch.column("verify_attempts")
        if self.attempt == 1:
            return pc.and_(rows, pc.is_null(attempts))
        failed = pc.and_(pc.fill_null(pc.equal(attempts, self.attempt - 1), False),
                         pc.is_null(batch.column("candidate")))  # fmt: skip
        return pc.and_(rows, failed)

    def process(self, rows: list[dict]) -> None:
        # Decode one row at a time and keep only its working-size copy: memory stays bounded by one
        # full-size image plus the batch at working size.
        buckets: dict[tuple[int, int], list[_Item]] = defaultdict(list)
        for row in rows:
            try:  # a JPEG decodes straight to this size, DCT-scaled (u2s.io.decode): never in full
                decoded = decode_image(
                    (row["image"] or {}).get("bytes") or b"",
                    size=self.editor.bucket_size,
                    resample=Image.Resampling.LANCZOS,
                )
            except DecodeError as e:
                mark_error(row, self.name, str(e))
                continue
            img, (width, height) = decoded.image, decoded.size
            original = (row["width"] or width, row["height"] or height)
            size = self.editor.bucket_size(width, height)
            work = img if img.size == size else img.resize(size, Image.Resampling.LANCZOS)
            buckets[size].append((row, work, original))
            del img, work

        step = self.config.max_batch or self.config.resources.batch_size
        for size in sorted(buckets):
            items = buckets[size]
            for start in range(0, len(items), step):
                self._edit_chunk(items[start : start + step])

    def _edit(self, items: list[tuple[_Item, int]]) -> list[Image.Image]:
        """One editor call on ``items`` (each with its seed); one output image per item."""
        outputs = self.editor.edit(
            [img for (_, img, _), _ in items], [edit_prompt(row) for (row, _, _), _ in items],
            [seed for _, seed in items],
        )  # fmt: skip
        if len(outputs) != len(items):
            raise RuntimeError("editor returned a wrong number of images")
        return outputs

    def _edit_chunk(self, items: list[_Item]) -> None:
        """Edit one chunk; out of device memory, its halves run separately (:func:`~u2s.healing.split_on_oom`)
        and a row that does not fit alone becomes an error row "out of memory"."""
        cfg = self.config
        rows = [row for row, _, _ in items]
        seeds = [attempt_seed(cfg.seed, row["id"], self.attempt) for row in rows]
        try:
            outputs = split_on_oom(self._edit, list(zip(items, seeds, strict=True)))
        except Exception as e:  # fail this chunk only; the message may quote private text, so drop it
            if classify(e) == "fatal":  # the device is gone: the stage restarts the actor
                raise
            logger.error("editor %s failed on %d rows: %s", self.editor.name, len(rows), type(e).__name__)
            for row in rows:
                mark_error(row, self.name, f"editor failed ({type(e).__name__})")
            return
        unchanged = 0
        for (row, work, original), out, seed in zip(items, outputs, seeds, strict=True):
            if isinstance(out, OutOfMemory):
                mark_error(row, self.name, out.reason)
                continue
            if same_pixels(out, work):  # nothing was hidden: publishing it would publish the original
                if self.verifying:  # a failed attempt: the next one edits the row again
                    record_attempt(row, self.attempt, self.editor.name, seed, ["unchanged"])
                else:
                    mark_error(row, self.name, UNCHANGED)
                unchanged += 1
                continue
            if out.size != original:
                out = out.resize(original, Image.Resampling.LANCZOS)
            data, ext = encode_image(out.convert("RGB"), self.output_format)
            image = {"bytes": data, "path": f"{row['id']}.{ext}"}
            row["width"], row["height"] = original
            row["editor"] = self.editor.name
            row["seed"] = seed
            if self.verifying:  # published only once verified; `image` keeps the original for the checks
                row["candidate"] = image
                row["verify_attempts"] = self.attempt
            else:
                row["image"] = image
                row["status"] = Status.EDITED.value
        if unchanged:
            logger.warning("editor %s left %d of %d images unchanged", self.editor.name, unchanged, len(rows))

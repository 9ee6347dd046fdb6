"""Closed-loop verification of edits (``stage2.verify``): an edit is published only once it passes.

A latent editor changes every pixel (the VAE round trip) yet may keep the face, the name tag or the
plate, so "the pixels changed" does not mean "anonymized". With ``stage2.verify.checks`` set, the edit
stage leaves its output in the working column ``candidate`` (``image`` keeps the original, the status
stays null) and :class:`VerifyStage` checks it:

- ``reinspect``: stage 1's call A (:class:`~u2s.stage1.inspect.InspectStage`: same engine, model, prompt,
  schema and pool settings as inspect) on a thumbnail of the edited image; a re-flag fails, unless every
  category it names is in ``reinspect_ignore``.
- ``faces``: dlib face embeddings (:class:`~u2s.eval.detectors.DlibFaceEmbedder`, the HOG detector of
  the baselines) of the original and of the edit; a face of the original whose nearest face in the edit
  is closer than ``face_distance`` fails.

A row that passes gets its edit as ``image``, status ``edited``, ``verified`` true; one that fails goes
on, in flight, to the next edit attempt (the ladder's next rung, a new seed) and its verification, and
after ``max_attempts`` becomes an error row (``verify: still private``, no image). Each attempt's
verdict is appended to the row's ``verify`` list (sensitive table only: it says what re-flagged); the
safe table publishes only ``verify_attempts`` and ``verified``.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from u2s.schema import Status, mark_error
from u2s.stage import Stage, in_flight

if TYPE_CHECKING:
    from PIL import Image

    from u2s.config import Resources, Stage1Config, Stage2Config, StorageConfig

logger = logging.getLogger(__name__)

#: The error reason of a row that no edit attempt made safe (content-free).
STILL_PRIVATE = "still private"
#: What a failed check is called in a row's ``verify`` record (besides ``unchanged``, from the editor).
REINSPECT, FACES = "reinspect", "faces"


def record_attempt(
    row: dict, attempt: int, editor: str | None, seed: int | None, failed: list[str],
    categories: list[str] | None = None, face_distance: float | None = None,
) -> None:  # fmt: skip
    """Append one attempt's verdict to ``row["verify"]`` (empty ``failed``: it passed)."""
    entry = {"attempt": attempt, "editor": editor, "seed": seed, "failed": failed, "categories": categories,
             "face_distance": face_distance}  # fmt: skip
    row["verify"] = [*(row.get("verify") or []), entry]
    row["verify_attempts"] = attempt


def verify_resources(stage2: Stage2Config, stage1: Stage1Config) -> Resources:
    """The pool of each verification: ``stage2.verify.resources``, else inspect's pool when the VLM
    re-inspects, else one CPU per actor (dlib only)."""
    from u2s.config import Resources

    verify = stage2.verify
    if verify.resources is not None:
        return verify.resources
    if "reinspect" in verify.checks:
        resources = stage1.calls.inspect.resources
        assert resources is not None  # inspect always has its own pool
        return resources
    return Resources(pool_size=1, batch_size=stage2.resources.batch_size, num_cpus=1.0)


class VerifyStage(Stage):
    """Checks the edits of attempt ``attempt``: publishes those that pass, fails rows out of attempts.

    ``thumbnail_side``: the VLM's image size (the thumbnail decode makes for stage 1); ``storage``: how to
    reach an s3:// VLM.
    """

    name = "verify"
    reads = ("image", "candidate", "editor", "seed", "verify_attempts", "verify")
    writes = ("image", "candidate", "editor", "seed", "verified", "verify_attempts", "verify")

    def __init__(
        self, stage2: Stage2Config, stage1: Stage1Config, attempt: int, thumbnail_side: int,
        storage: StorageConfig | None = None,
    ) -> None:  # fmt: skip
        from u2s.torch_utils import set_threads

        self.config = stage2.verify
        self.attempt = attempt
        self.last = attempt >= self.config.max_attempts
        self.thumbnail_side = thumbnail_side
        self.ignore = frozenset(self.config.reinspect_ignore)
        set_threads(verify_resources(stage2, stage1).threads())
        self.inspect = None
        if REINSPECT in self.config.checks:
            from u2s.stage1.engines import build_engine
            from u2s.stage1.inspect import InspectStage

            engine = build_engine(
                stage1, stage1.engine_for("inspect"), InspectStage.model(stage1), InspectStage.vision, storage
            )
            self.inspect = InspectStage(stage1, engine)
        self.faces = None
        if FACES in self.config.checks:
            from u2s.eval.detectors import DlibFaceEmbedder

            self.faces = DlibFaceEmbedder(self.config.face_upsample)
        self._faces_lock = threading.Lock()  # vLLM pools call an actor from several threads

    def wanted(self, batch: pa.Table) -> pa.ChunkedArray:
        """In-flight rows edited (or tried) by this attempt."""
        attempts = pc.fill_null(pc.equal(batch.column("verify_attempts"), self.attempt), False)
        return pc.and_(in_flight(batch), attempts)

    def process(self, rows: list[dict]) -> None:
        from u2s.io.decode import DecodeError, load_rgb

        # Rows whose attempt left the image unchanged were already recorded as failed by the editor.
        todo, originals, edits = [], [], []
        for row in rows:
            if row["candidate"] is None:
                continue
            try:
                edit = load_rgb(row["candidate"]["bytes"])
                original = load_rgb((row["image"] or {}).get("bytes") or b"") if self.faces else None
            except DecodeError as e:  # our own encoding: a bug or corruption in transit
                mark_error(row, self.name, f"unreadable image ({type(e).__name__})")
                continue
            todo.append(row)
            edits.append(edit)
            originals.append(original)
        failed: list[list[str]] = [[] for _ in todo]
        categories: list[list[str] | None] = [None] * len(todo)
        distances: list[float | None] = [None] * len(todo)
        if self.inspect is not None and todo:
            for i, (verdict, named) in enumerate(self._reinspect(todo, edits)):
                categories[i] = named
                if verdict:
                    failed[i].append(REINSPECT)
        if self.faces is not None:
            for i, (original, edit) in enumerate(zip(originals, edits, strict=True)):
                distances[i] = self._nearest_face(original, edit)
                if distances[i] is not None and distances[i] < self.config.face_distance:
                    failed[i].append(FACES)
        for i, row in enumerate(todo):
            record_attempt(
                row, self.attempt, row["editor"], row["seed"], failed[i], categories[i], distances[i]
            )
            if not failed[i]:
                row["image"], row["candidate"] = row["candidate"], None
                row["status"], row["verified"] = Status.EDITED.value, True
            else:
                row["candidate"] = None
        out_of_attempts = 0
        for row in rows:
            if row["status"] is None and row["candidate"] is None and self.last:
                row["editor"] = row["seed"] = None  # nothing of this row is published
                row["verified"] = False
                mark_error(row, self.name, STILL_PRIVATE)
                out_of_attempts += 1
        retried = sum(1 for row in rows if row["status"] is None)
        if retried or out_of_attempts:
            logger.info(
                "verify attempt %d: %d of %d rows failed a check (%d to edit again, %d out of attempts)",
                self.attempt, retried + out_of_attempts, len(rows), retried, out_of_attempts,
            )  # fmt: skip

    def _reinspect(self, rows: list[dict], edits: list[Image.Image]) -> list[tuple[bool, list[str] | None]]:
        """Call A on each edit: (fails, categories named). A row the model could not answer fails (a
        check that did not run never passes an image)."""
        from u2s.io.decode import thumbnail

        assert self.inspect is not None
        probes = [{"id": row["id"], "status": None, "error": None, "privacy_flag": None, "categories": None,
                   "thumbnail": thumbnail(edit, self.thumbnail_side)}
                  for row, edit in zip(rows, edits, strict=True)]  # fmt: skip
        self.inspect.process(probes)
        verdicts = []
        for probe in probes:
            if probe["status"] == Status.ERROR.value:
                verdicts.append((True, None))
                continue
            named = list(probe["categories"] or [])
            flagged = bool(probe["privacy_flag"]) and (not named or bool(set(named) - self.ignore))
            verdicts.append((flagged, named))
        return verdicts

    def _nearest_face(self, original: Image.Image | None, edit: Image.Image) -> float | None:
        """Smallest embedding distance between a face of the original and a face of the edit (None when
        either has no face: nothing of the original's faces is left to recognise)."""
        import numpy as np

        assert self.faces is not None and original is not None
        with self._faces_lock:
            before, after = self.faces(original), self.faces(edit)
        if not len(before) or not len(after):
            return None
        distances = np.linalg.norm(before[:, None, :] - after[None, :, :], axis=-1)
        return float(distances.min())

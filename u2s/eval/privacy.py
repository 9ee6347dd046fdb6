"""Privacy metrics (PAPER.md §4): FaceSim (paper and strict), TextSim (OCR and VLM), Race Entropy, VLMScore.

Lower FaceSim/TextSim and higher Race Entropy/VLMScore are better. Every text read from an image or
given by a model is private content: it is compared here and dropped, never stored or logged.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np

from u2s.eval.metrics import MetricFamily, Pair, Score, Skip

if TYPE_CHECKING:
    from u2s.eval.config import EvalConfig

NO_ORIGINAL_FACE = Skip("no face in the original")
NO_ANONYMIZED_FACE = Skip("no face in the anonymized image")
NO_ORIGINAL_TEXT = Skip("no text in the original")


def face_similarity(original: np.ndarray, anonymized: np.ndarray, strict: bool = False) -> Score:
    """FaceSim of one pair from face embeddings (rows): for each original face, the highest cosine
    similarity to any anonymized face (its nearest counterpart), averaged over the original faces.

    No original face → skipped. No anonymized face → skipped (the paper), or 0.0 per original face when
    ``strict`` (a vanished face is a perfect anonymization of that face, not a missing value).
    """
    if len(original) == 0:
        return NO_ORIGINAL_FACE
    if len(anonymized) == 0:
        return 0.0 if strict else NO_ANONYMIZED_FACE
    a = original / np.linalg.norm(original, axis=1, keepdims=True)
    b = anonymized / np.linalg.norm(anonymized, axis=1, keepdims=True)
    nearest = np.clip(a @ b.T, -1.0, 1.0).max(axis=1)
    return float(nearest.mean())


def text_similarity(original: str, anonymized: str) -> Score:
    """TextSim: ``rapidfuzz.fuzz.token_set_ratio(original, anonymized) / 100``; no original text → skipped
    (nothing could leak). Text that vanished from the anonymized image scores 0."""
    from rapidfuzz import fuzz

    if not original.strip():
        return NO_ORIGINAL_TEXT
    return fuzz.token_set_ratio(original, anonymized) / 100.0


class _OriginalCache:
    """What a family derived from an original image (embeddings, OCR text), by row id: the same original
    comes once per method, and the join on id delivers those rows together. Memory only, bounded."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self.items: OrderedDict[str, Any] = OrderedDict()

    def get(self, key: str, compute):
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = self.items[key] = compute()
        if len(self.items) > self.size:
            self.items.popitem(last=False)
        return value


class FaceFamily(MetricFamily):
    """``face_sim`` and ``face_sim_strict``: both images resized to ``models.face.size``², then embedded."""

    family = "face"

    def __init__(self, config: EvalConfig, metrics: list[str]) -> None:
        from u2s.eval.detectors import load_face_embedder

        super().__init__(config, metrics)
        self.embed = load_face_embedder(config.models.face)
        self.originals = _OriginalCache()

    def score(self, pairs: list[Pair]) -> list[dict[str, Score]]:
        from u2s.eval.detectors import square

        size = self.config.models.face.size
        out = []
        for pair in pairs:
            original = self.originals.get(pair.id, lambda p=pair: self.embed(square(p.original, size)))
            anonymized = self.embed(square(pair.anonymized, size)) if len(original) else original
            scores = {
                "face_sim": face_similarity(original, anonymized),
                "face_sim_strict": face_similarity(original, anonymized, strict=True),
            }
            out.append({name: scores[name] for name in self.metrics})
        return out


class OcrTextFamily(MetricFamily):
    """``text_sim`` with rapidocr's bundled detector and recognizer."""

    family = "ocr"

    def __init__(self, config: EvalConfig, metrics: list[str]) -> None:
        from u2s.eval.detectors import OcrReader

        super().__init__(config, metrics)
        self.read = OcrReader(config.models.ocr, threads=config.resources.ocr.threads())
        self.originals = _OriginalCache()

    def score(self, pairs: list[Pair]) -> list[dict[str, Score]]:
        out = []
        for pair in pairs:
            original = self.originals.get(pair.id, lambda p=pair: self.read(p.original))
            anonymized = self.read(pair.anonymized) if original.strip() else ""
            out.append({"text_sim": text_similarity(original, anonymized)})
        return out


class VlmFamily(MetricFamily):
    """``text_sim_vlm``, ``race_entropy`` and ``vlm_score``: the paper's prompts on a stage-1 engine.

    Each question is one batched, schema-constrained call (greedy, one sampled retry of invalid
    answers); an answer that stays invalid skips that pair with ``invalid answer``.
    """

    family = "vlm"

    def __init__(self, config: EvalConfig, metrics: list[str]) -> None:
        from u2s.config import GenerationConfig
        from u2s.eval.vlm import build_vlm_engine

        super().__init__(config, metrics)
        vlm = config.models.vlm
        assert vlm is not None  # enforced by EvalConfig
        self.settings = vlm
        self.generation = GenerationConfig(
            max_new_tokens=vlm.max_new_tokens, retry_temperature=vlm.retry_temperature
        )
        needs_reader = "text_sim_vlm" in metrics or "race_entropy" in metrics
        self.reader = build_vlm_engine(vlm, vlm.model) if needs_reader else None
        self.judge = None
        if "vlm_score" in metrics:
            same = vlm.judge is None or vlm.judge == vlm.model
            self.judge = (
                self.reader
                if same and self.reader is not None
                else build_vlm_engine(vlm, vlm.judge or vlm.model)
            )

    def _ask(self, engine, prompt: str, system: str, images: list, answer: type, keys: list[str]) -> list:
        """One validated answer per image; a retry samples under a seed of the image's key."""
        from u2s.eval.vlm import conversation
        from u2s.stage1.engines import generate_validated
        from u2s.stage1.rows import sampling_seeds

        conversations = [conversation(prompt, system)] * len(images)
        seeds = sampling_seeds(keys)
        return generate_validated(engine, conversations, images, answer, self.generation, seeds=seeds)

    def score(self, pairs: list[Pair]) -> list[dict[str, Score]]:
        from u2s.eval import vlm
        from u2s.stage1.engines.messages import fit_image
        from u2s.stage1.schemas import OutputError

        size = self.settings.image_size
        keys = [f"{p.method}/{p.id}" for p in pairs]
        out: list[dict[str, Score]] = [{} for _ in pairs]
        invalid = Skip("invalid answer")
        if "text_sim_vlm" in self.metrics:
            images = [fit_image(img, size) for p in pairs for img in (p.original, p.anonymized)]
            sides = [f"{key}/{side}" for key in keys for side in ("original", "anonymized")]
            answers = self._ask(
                self.reader, vlm.TEXT_PROMPT, vlm.ANALYST_SYSTEM, images, vlm.TextAnswer, sides
            )
            for i, (original, anonymized) in enumerate(zip(answers[::2], answers[1::2], strict=True)):
                if isinstance(original, OutputError) or isinstance(anonymized, OutputError):
                    out[i]["text_sim_vlm"] = invalid
                else:
                    out[i]["text_sim_vlm"] = text_similarity(original.text(), anonymized.text())
        if "race_entropy" in self.metrics:
            images = [fit_image(p.anonymized, size) for p in pairs]
            answers = self._ask(
                self.reader, vlm.DEMOGRAPHICS_PROMPT, vlm.ANALYST_SYSTEM, images, vlm.DemographicsAnswer, keys
            )
            for i, answer in enumerate(answers):
                if isinstance(answer, OutputError):
                    out[i]["race_entropy"] = invalid
                elif answer.NO_HUMAN:
                    out[i]["race_entropy"] = Skip("no person")
                else:
                    out[i]["race_entropy"] = vlm.race_entropy(answer.RACE, self.settings.race_labels)
        if "vlm_score" in self.metrics:
            images = [vlm.side_by_side(p.original, p.anonymized, size) for p in pairs]
            answers = self._ask(self.judge, vlm.JUDGE_PROMPT, vlm.JUDGE_SYSTEM, images, vlm.JudgeAnswer, keys)
            for i, answer in enumerate(answers):
                ok = not isinstance(answer, OutputError)
                out[i]["vlm_score"] = float(answer.ANONYMIZATION_SCORE) if ok else invalid
        return out

"""Quality metrics (PAPER.md §4, grouping inferred): CLIP image-text and directional CLIP.

Both use one CLIP model (the paper: ViT-L/14), which also gives the Cheating group's CLIP image-image
score; the three live in one family so the model loads once per actor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from u2s.eval.metrics import MetricFamily, Pair, Score, Skip

if TYPE_CHECKING:
    from u2s.eval.config import EvalConfig

NO_CAPTION = Skip("no public caption")
NO_PRIVATE_CAPTION = Skip("no private caption (needs --sensitive)")
NO_CHANGE = Skip("images identical: no direction")
#: Below this norm an embedding difference counts as no change (cosine undefined).
MIN_DIRECTION = 1e-6


def target_caption(pair: Pair) -> str | None:
    """The caption of the anonymized image: stage 1's combined caption when there is one (the public
    caption with the edit applied), else the public caption."""
    return pair.combined_caption or pair.public_caption


class ClipFamily(MetricFamily):
    """``clip_text``: cos(E_img(anonymized), E_txt(caption)); ``clip_direction``: cos(E_img(anonymized) −
    E_img(original), E_txt(caption) − E_txt(private caption)); ``clip_image``: cos of the two images."""

    family = "clip"

    def __init__(self, config: EvalConfig, metrics: list[str]) -> None:
        from u2s.eval.detectors import ClipEncoder
        from u2s.torch_utils import set_threads

        super().__init__(config, metrics)
        set_threads(config.resources.clip.threads())
        self.clip = ClipEncoder(config.models.clip)

    def score(self, pairs: list[Pair]) -> list[dict[str, Score]]:
        images = self.clip.images([p.original for p in pairs] + [p.anonymized for p in pairs])
        originals, anonymized = images[: len(pairs)], images[len(pairs) :]
        targets = [target_caption(p) for p in pairs]
        sources = [p.private_caption for p in pairs]
        texts = sorted({t for t in targets + sources if t})
        encoded = self.clip.texts(texts) if texts else None
        index = {t: i for i, t in enumerate(texts)}
        out = []
        for i, (target, source) in enumerate(zip(targets, sources, strict=True)):
            scores: dict[str, Score] = {"clip_image": float(originals[i] @ anonymized[i])}
            if target is None:
                scores["clip_text"] = scores["clip_direction"] = NO_CAPTION
            else:
                t = encoded[index[target]]
                scores["clip_text"] = float(anonymized[i] @ t)
                if source is None:
                    scores["clip_direction"] = NO_PRIVATE_CAPTION
                else:
                    direction = t - encoded[index[source]]
                    scores["clip_direction"] = _cosine(anonymized[i] - originals[i], direction)
            out.append({name: scores[name] for name in self.metrics})
        return out


def _cosine(a, b) -> Score:
    import torch

    if float(a.norm()) < MIN_DIRECTION or float(b.norm()) < MIN_DIRECTION:
        return NO_CHANGE
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))

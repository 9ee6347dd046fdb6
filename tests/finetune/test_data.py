"""``build_pairs``: a run's tables joined by id into training pairs, CLIP-filtered, split by id hash."""

from __future__ import annotations

import io
import statistics

from finetune_helpers import finetune_config
from PIL import Image


def _clip_scores(clip_path, run: dict) -> dict[str, tuple[float, float]]:
    """Per id, CLIP(edited, caption) and CLIP(original, caption), with the eval suite's encoder."""
    from u2s.config_base import ModelConfig
    from u2s.eval.detectors import ClipEncoder

    clip = ClipEncoder(ModelConfig(model=str(clip_path), dtype="float32", device="cpu"))
    scores = {}
    for id in run["ids"]:
        text = clip.texts([run["prompts"][id].public_caption])[0]
        edited, original = clip.images([Image.open(io.BytesIO(run[k][id])) for k in ("edited", "originals")])
        scores[id] = (float(edited @ text), float(original @ text))
    return scores


def test_pairs_join_the_tables_filter_by_the_clip_ratio_and_split_by_id(
    ray_cluster, tiny_run, tiny_clip, tmp_path
):
    from u2s.finetune.data import build_pairs, is_val

    scores = _clip_scores(tiny_clip, tiny_run)
    # A threshold between the pairs' own ratios, so that the filter both keeps and drops pairs.
    ratios = sorted(e / o for e, o in scores.values() if o > 0)
    threshold = statistics.median(ratios)
    expected = {id for id, (e, o) in scores.items() if e > threshold * o}
    assert 0 < len(expected) < len(scores)

    cfg = finetune_config(
        tiny_run, tiny_clip, str(tmp_path), clip_ratio_threshold=threshold, val_fraction=0.3,
        clip_model={"model": str(tiny_clip), "dtype": "float32", "device": "cpu"},
    )  # fmt: skip
    train, val, counts = build_pairs(cfg)
    train_rows, val_rows = train.take_all(), val.take_all()

    val_ids = {id for id in expected if is_val(id, cfg.seed, cfg.val_fraction)}
    assert {r["id"] for r in val_rows} == val_ids
    assert {r["id"] for r in train_rows} == expected - val_ids
    assert len(train_rows) + len(val_rows) == len(expected)  # each pair once
    assert counts == {"rows": 12, "edited": 10, "missing_original": 0, "clip_filtered": 10 - len(expected),
                      "train": len(expected - val_ids), "val": len(val_ids)}  # fmt: skip
    for row in train_rows + val_rows:
        id = row["id"]
        assert row["original"] == tiny_run["originals"][id] and row["edited"] == tiny_run["edited"][id]
        assert row["edit_instruction"] == tiny_run["prompts"][id].edit_instruction
        assert row["public_caption"] == tiny_run["prompts"][id].public_caption
        assert set(row) == {"id", "original", "edited", "edit_instruction", "public_caption"}

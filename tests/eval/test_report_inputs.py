"""What the report is fed: the sampled rows (edited, then error rows with their reason, then kept rows)
and which models have random weights (the tiny models' marker, found through a run's record)."""

from __future__ import annotations

import json

import pyarrow as pa

from u2s.eval.config import EvalConfig
from u2s.eval.evaluate import _Samples
from u2s.eval.random_models import is_random, random_models
from u2s.testing.tiny_models import TINY_MARKER


def _batch(rows: list[dict]) -> pa.Table:
    thumb = b"\xff\xd8thumb"
    full = []
    for row in rows:
        scored = row["status"] != "error"
        image = thumb if scored else None
        full.append({"method": "m", "privacy_flag": row["status"] == "edited", "error": None,
                     "eval_status": "scored" if scored else "error", "ssim": 0.5 if scored else None,
                     "thumb_original": image, "thumb_anonymized": image,
                     "public_caption": None, "edit_instruction": None, **row})  # fmt: skip
    return pa.Table.from_pylist(full)


def test_samples_lead_with_edited_then_error_rows_and_keep_the_reason():
    samples = _Samples(k=5, seed=0, metrics=["ssim"], texts=False)
    kept = [{"id": f"k{i}", "status": "kept"} for i in range(4)]
    samples.add(_batch([*kept[:2], {"id": "x1", "status": "error", "error": "edit: unexpected OSError"}]))
    samples.add(_batch([{"id": "e1", "status": "edited"}, *kept[2:], {"id": "e2", "status": "edited"}]))
    shown = samples.by_method(["m"])["m"]
    assert [s.status for s in shown] == ["edited", "edited", "error", "kept", "kept"]  # k=5 of 7 rows
    error = shown[2]
    assert (error.id, error.error, error.original_jpeg, error.anonymized_jpeg) == (
        "x1", "edit: unexpected OSError", None, None,
    )  # fmt: skip
    assert all(s.original_jpeg for s in shown if s.status != "error")


def test_random_models_are_found_through_the_run_record_and_the_eval_config(tiny_models, tmp_path):
    clip = tiny_models["clip"]  # the suite's tiny models, as `u2s tiny-models` builds them
    assert json.loads((clip / TINY_MARKER).read_text())["u2s_tiny"] is True
    real = tmp_path / "real-model"
    real.mkdir()
    assert is_random(str(clip)) and not is_random(str(real))
    assert not is_random("openai/clip-vit-large-patch14") and not is_random("<redacted>")

    def record(folder, vlm, editor_model, other_model):
        folder.mkdir()
        stage2 = {"editor": "instruct_pix2pix", "instruct_pix2pix": {"model": {"model": editor_model}},
                  "flux_kontext": {"model": {"model": other_model}}}  # fmt: skip
        config = {"stage1": {"vlm": {"model": vlm}, "llm": {"model": str(real)}}, "stage2": stage2}
        (folder / "_run.json").write_text(json.dumps({"config": config}))
        return str(folder)

    # the run given with --sensitive: its full record (paths) is beside the sensitive table
    sensitive = record(tmp_path / "sensitive", str(clip), str(clip), str(clip))
    safe = record(tmp_path / "safe", "<redacted>", "<redacted>", "<redacted>")
    # another method whose safe record names its models (an unredacted record)
    other = record(tmp_path / "other", str(real), str(clip), str(real))
    base = {
        "original": {"uri": str(tmp_path)},
        "out": str(tmp_path / "eval"),
        "metrics": ["ssim", "clip_text"],
    }
    methods = {"run": safe, "other": other}
    cfg = EvalConfig.model_validate({**base, "methods": methods, "sensitive_uri": sensitive,
                                     "models": {"clip": {"model": str(clip)}}})  # fmt: skip
    assert random_models(cfg) == {
        "eval": ["models.clip"],
        "run": ["stage1.vlm", "stage2.instruct_pix2pix.model"],  # not flux_kontext: not the run's editor
        "other": ["stage2.instruct_pix2pix.model"],
    }
    plain = EvalConfig.model_validate({**base, "metrics": ["ssim"], "methods": {"run": safe},
                                       "models": {"clip": {"model": str(clip)}}})  # fmt: skip
    assert random_models(plain) == {}  # no CLIP metric, and the safe record's paths are redacted

"""A run whose model cannot load fails before writing a row, says how to go on, and — nothing written —
resumes with the fixed config (a changed config is refused only once rows exist)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from u2s.config import load_config
from u2s.io.writers import read_columns
from u2s.pipeline import JobFailed, run
from u2s.run_record import ResumeRefused
from u2s.testing.chat_server import ChatRequest, OracleChatServer, oracle_overrides


def _answer(request: ChatRequest) -> dict:
    return {"privacy_flag": False, "categories": []}


def test_a_model_that_does_not_load_fails_before_any_row_and_a_fixed_config_resumes(ray_cluster, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng()
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(images / f"{i}.png")
    out = tmp_path / "out"
    base = [f"input.uri={images}", f"output.uri={out}/safe", f"output.sensitive_uri={out}/sensitive",
            "stage1.image_size=32"]  # fmt: skip
    with OracleChatServer(_answer) as url:
        broken = load_config(preset="cpu-tiny", overrides=[
            *base, *oracle_overrides(url), f"stage2.instruct_pix2pix.model.model={tmp_path / 'no-editor'}",
        ])  # fmt: skip
        with pytest.raises(JobFailed) as failed:
            run(broken)
        assert "before writing any row" in str(failed.value) and "--resume" in str(failed.value)
        record = json.loads(Path(broken.output.sensitive_uri, "_run.json").read_text())
        assert [a["status"] for a in record["attempts"]] == ["failed"]

        fixed = load_config(
            preset="cpu-tiny", overrides=[*base, *oracle_overrides(url), "stage2.editor=blur_image"]
        )
        summary = run(fixed, resume=True)  # nothing was written: the changed config is accepted
        assert summary.rows == 4 and summary.by_status.get("kept") == 4
        record = json.loads(Path(fixed.output.sensitive_uri, "_run.json").read_text())
        assert [a["status"] for a in record["attempts"]] == ["failed", "succeeded"]

        again = load_config(preset="cpu-tiny", overrides=[*base, *oracle_overrides(url), "stage2.seed=7"])
        with pytest.raises(ResumeRefused):  # rows exist now: another config may not add to them
            run(again, resume=True)
    assert read_columns(fixed.output.uri, fixed.storage, ["id"]).num_rows == 4

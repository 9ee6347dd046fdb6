"""``run.max_error_fraction``: a run whose rows all fail stops early, says why (the top reasons, counted)
and how to continue, and its record marks the attempt ``stopped``.

The input is all unreadable files (what a wrong input or decode setting gives: every row a decode error
row); stage 1 runs on the oracle chat server and the editor is the model-free blur, so the run is cheap.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from u2s.config import load_config
from u2s.io.writers import read_columns
from u2s.pipeline import JobFailed, run
from u2s.testing.chat_server import ChatRequest, OracleChatServer, oracle_overrides

IMAGES = 24


def _answer(request: ChatRequest) -> dict:
    return {"privacy_flag": False, "categories": []}


def test_a_run_whose_rows_all_fail_stops_early_naming_the_top_reasons(ray_cluster, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(IMAGES):
        (images / f"{i:03d}.png").write_bytes(b"not an image at all")
    out = tmp_path / "out"
    with OracleChatServer(_answer) as url:
        cfg = load_config(
            preset="cpu-tiny",
            overrides=[
                f"input.uri={images}",
                f"output.uri={out}/safe",
                f"output.sensitive_uri={out}/sensitive",
                "output.rows_per_file=2",
                *oracle_overrides(url),
                "stage2.editor=blur_image",
                "run.max_error_fraction=0.5",
                "run.min_rows_for_error_fraction=4",
            ],
        )
        with pytest.raises(JobFailed) as stopped:
            run(cfg)
    message = str(stopped.value)
    assert "run.max_error_fraction=0.5" in message and "--resume" in message
    assert "'decode: " in message and " x" in message  # the top reason, counted
    assert str(images) not in message and "000.png" not in message  # reasons are content-free
    written = read_columns(cfg.output.uri, cfg.storage, ["id"]).num_rows
    assert written < IMAGES
    assert f"{written} row(s) are written" in message
    record = json.loads(Path(cfg.output.sensitive_uri, "_run.json").read_text())
    attempt = record["attempts"][-1]
    assert attempt["status"] == "stopped" and attempt["written"] == written
    assert attempt["reasons"] and all(reason.startswith("decode: ") for reason in attempt["reasons"])

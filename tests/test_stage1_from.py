"""``u2s run --stage1-from`` (``input.stage1_from``): a run that takes stage 1's results from an earlier
run's sensitive table and only edits.

The earlier run's stage 1 is the oracle chat server (it flags the red pictures, keeps the green ones; a
broken file fails in decode, before stage 1); its editor blurs whole images. The second run names stage-1
models that do not exist and no server runs: it still finishes, because it builds no stage-1 pool. Its
editor (``blur`` over faces, whole-image blur when none is found) edits the flagged rows; the unflagged
ones are published byte for byte as the first run published them; the broken row stays an error row; ids,
sources and stage-1 columns are the first run's. A resume after losing a file pair finishes every row
exactly once, and a resume after the earlier run changed is refused.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from u2s.cli import app
from u2s.config import JobConfig, load_config
from u2s.io.errors import InputError
from u2s.io.ids import read_id_key
from u2s.io.stage1_from import NO_RESULT, STAGE1_COLUMNS, source_run
from u2s.io.writers import parquet_files, read_columns
from u2s.pipeline import run, stage_pools
from u2s.preflight import check_job
from u2s.run_record import ResumeRefused
from u2s.schema import SENSITIVE_SCHEMA
from u2s.testing.chat_server import ChatRequest, OracleChatServer, oracle_overrides

RED, GREEN = (200, 60, 60), (60, 200, 60)
PICTURES = {f"red{i}": RED for i in range(3)} | {f"green{i}": GREEN for i in range(3)}
BROKEN = "broken"


def _noise(colour: tuple[int, int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.integers(-40, 41, (48, 48, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _answer(request: ChatRequest) -> dict:
    if "privacy_flag" in request.fields:  # call A: red pictures are private
        red, green, _ = np.asarray(request.image, dtype=np.float64).mean(axis=(0, 1))
        flag = bool(red > green)
        return {"privacy_flag": flag, "categories": ["people"] if flag else []}
    if "review" in request.fields:  # call B
        review = [{"item": "a face", "reason": "identifies a person", "category": "people"}]
        return {"review": review, "private_caption": "Jane at home.", "public_caption": "A person at home."}
    return {"edit_instruction": "give the person short grey hair"}  # call C


def _tables(cfg: JobConfig) -> tuple[dict[str, dict], dict[str, dict]]:
    """id → row of the safe and the sensitive table; fails on a duplicate id."""
    out = []
    for uri, columns in ((cfg.output.uri, ["id", "image", "status", "editor"]),
                         (cfg.output.sensitive_uri, SENSITIVE_SCHEMA.names)):  # fmt: skip
        rows = read_columns(uri, cfg.storage, columns).to_pylist()
        ids = [row["id"] for row in rows]
        assert len(ids) == len(set(ids)), f"duplicate ids in {uri}"
        out.append({row["id"]: row for row in rows})
    return out[0], out[1]


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1-from")
    images = root / "images"
    images.mkdir()
    for seed, (name, colour) in enumerate(PICTURES.items()):
        _noise(colour, seed).save(images / f"{name}.png")
    (images / f"{BROKEN}.png").write_bytes(b"not an image")
    common = ["output.rows_per_file=2", "stage1.image_size=32"]
    with OracleChatServer(_answer) as url:
        first = load_config(preset="cpu-tiny", overrides=[
            f"input.uri={images}", f"output.uri={root}/first/safe",
            f"output.sensitive_uri={root}/first/sensitive", *common, *oracle_overrides(url),
            "stage2.editor=blur_image",
        ])  # fmt: skip
        first_summary = run(first)
    assert first_summary.by_status == {"kept": 3, "edited": 3, "error": 1}
    # No server now, and stage-1 models that do not exist: only a run that loads none can finish.
    second = load_config(preset="cpu-tiny", overrides=[
        f"input.uri={root}/nowhere", f"input.stage1_from={first.output.sensitive_uri}",
        f"output.uri={root}/second/safe", f"output.sensitive_uri={root}/second/sensitive", *common,
        f"stage1.vlm.model={root}/no-such-vlm", f"stage1.llm.model={root}/no-such-llm",
        "stage2.editor=blur", "stage2.blur.regions=[faces]",
    ])  # fmt: skip
    check_job(second)  # preflight checks no stage-1 model, and the earlier run's output as the input
    summary = run(second)
    return {"root": root, "images": images, "first": first, "second": second, "summary": summary}


def test_no_stage1_pool_is_planned_or_built(runs):
    assert set(stage_pools(runs["second"])) == {"decode", "edit", "write"}
    assert "inspect" in "".join(stage_pools(runs["first"]))
    assert runs["summary"].by_status == {"kept": 3, "edited": 3, "error": 1}
    assert not {"inspect", "describe", "instruct"} & set(runs["summary"].stage_rows)  # no stage-1 call ran


def test_rows_ids_and_stage1_results_are_the_earlier_runs(runs):
    first_safe, first_sensitive = _tables(runs["first"])
    safe, sensitive = _tables(runs["second"])
    assert set(safe) == set(sensitive) == set(first_safe) == set(first_sensitive)
    assert len(safe) == len(PICTURES) + 1
    for row_id, row in sensitive.items():
        before = first_sensitive[row_id]
        assert row["source"] == before["source"] and row["label"] == before["label"]
        if before["status"] != "error":
            assert {c: row[c] for c in STAGE1_COLUMNS} == {c: before[c] for c in STAGE1_COLUMNS}
    assert read_id_key(runs["second"].output.sensitive_uri, runs["second"].storage) == read_id_key(
        runs["first"].output.sensitive_uri, runs["first"].storage
    )


def test_flagged_rows_are_edited_by_this_runs_editor_and_the_others_keep_their_published_bytes(runs):
    first_safe, first_sensitive = _tables(runs["first"])
    safe, sensitive = _tables(runs["second"])
    by_name = {Path(row["source"]).stem: row_id for row_id, row in sensitive.items()}
    for name, colour in PICTURES.items():
        row_id = by_name[name]
        if colour == RED:
            assert sensitive[row_id]["privacy_flag"] and safe[row_id]["status"] == "edited"
            assert safe[row_id]["editor"] == "blur" and first_safe[row_id]["editor"] == "blur_image"
            edited = np.asarray(Image.open(io.BytesIO(safe[row_id]["image"]["bytes"])))
            original = np.asarray(Image.open(runs["images"] / f"{name}.png").convert("RGB"))
            assert edited.shape == original.shape and not np.array_equal(edited, original)
        else:
            assert safe[row_id]["status"] == first_safe[row_id]["status"] == "kept"
            assert safe[row_id]["image"]["bytes"] == first_safe[row_id]["image"]["bytes"]
    broken = sensitive[by_name[BROKEN]]
    assert first_sensitive[by_name[BROKEN]]["error"].startswith("decode:")
    assert broken["status"] == "error" and broken["error"] == NO_RESULT
    assert safe[by_name[BROKEN]]["image"] is None


def test_the_record_names_the_earlier_run_and_the_safe_side_does_not(runs):
    first, second = runs["first"], runs["second"]
    source_record = json.loads(Path(first.output.sensitive_uri, "_run.json").read_text())
    record = json.loads(Path(second.output.sensitive_uri, "_run.json").read_text())
    assert record["stage1_from"]["uri"] == first.output.sensitive_uri
    assert record["stage1_from"]["config_fingerprint"] == source_record["config_fingerprint"]
    assert record["stage1_from"]["input_fingerprint"] == source_record["input_fingerprint"]
    assert record["input_fingerprint"] == source_record["input_fingerprint"]  # the same (id, source) rows
    for path in Path(second.output.uri).rglob("*"):  # the safe output: table, card, public record
        if path.is_file():
            data = path.read_bytes()
            assert str(runs["root"]).encode() not in data, path.name
            assert b"stage1_from" not in data, path.name


def test_resume_after_losing_a_file_pair_finishes_every_row_once(runs):
    cfg = runs["second"]
    names = parquet_files(cfg.output.uri, cfg.storage)
    lost = pq.read_table(Path(cfg.output.uri, names[0]), columns=["id"]).num_rows
    Path(cfg.output.uri, names[0]).unlink()  # its sensitive twin is left uncommitted
    summary = run(cfg, resume=True)
    assert summary.resumed == len(PICTURES) + 1 - lost and summary.written == lost
    assert summary.by_status == {"kept": 3, "edited": 3, "error": 1}
    safe, sensitive = _tables(cfg)
    assert set(safe) == set(sensitive) and len(safe) == len(PICTURES) + 1


def test_resume_is_refused_when_the_earlier_run_changed(runs):
    first, cfg = runs["first"], runs["second"]
    path = Path(first.output.sensitive_uri, "_run.json")
    text = path.read_text()
    record = json.loads(text)
    record["attempts"][-1]["finished"] = "2030-01-01T00:00:00+00:00"  # e.g. resumed with --retry-errors
    try:
        path.write_text(json.dumps(record))
        with pytest.raises(ResumeRefused, match="stage1_from"):
            run(cfg, resume=True)
    finally:
        path.write_text(text)


def test_an_unfinished_or_missing_earlier_run_is_refused(runs, tmp_path):
    with pytest.raises(InputError, match="no run record"):
        source_run(str(tmp_path), runs["first"].storage)
    record = json.loads(Path(runs["first"].output.sensitive_uri, "_run.json").read_text())
    record["attempts"][-1]["status"] = "interrupted"
    (tmp_path / "_run.json").write_text(json.dumps(record))
    with pytest.raises(InputError, match="did not finish"):
        source_run(str(tmp_path), runs["first"].storage)


def test_run_help_lists_the_option_with_input_and_output():
    result = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    panel = re.search(r"Input and output(.*?)╰", result.output, re.S)
    assert panel and "--stage1-from" in panel.group(1)

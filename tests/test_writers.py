"""Sinks: one write pass produces both tables; unsafe rows never publish an image."""

from __future__ import annotations

import json

import pyarrow.dataset as pads
import pytest

from u2s.config import OutputConfig, StorageConfig
from u2s.io.writers import (
    OutputExistsError,
    SafeAndTripletsDatasink,
    finalize_row,
    prepare_outputs,
    safe_record,
    write_run_record,
)
from u2s.schema import SAFE_SCHEMA, new_row, rows_to_table


def _rows() -> list[dict]:
    kept = new_row("k", "/d/k.png", None, b"kept-bytes")
    kept.update(status="kept", privacy_flag=False, categories=[], timings={"inspect": 0.5})
    edited = new_row("e", "/d/e.png", "cat", b"edited-bytes")
    edited.update(
        status="edited", privacy_flag=True, categories=["people"], public_caption="a person",
        private_caption="Jane Doe at her desk", edit_instruction="change the hair", editor="x", seed=3,
        review=[{"item": "face", "reason": "identity", "category": "people"}],
        timings={"inspect": 0.5, "edit": 2.0},
    )  # fmt: skip
    failed = new_row("f", "/d/f.png", None, b"private-original")
    failed.update(privacy_flag=True, public_caption="half-done", private_caption="Jane Doe")
    failed.update(status="error", error="instruct: invalid output after retry")
    stray = new_row("s", "/d/s.png", None, b"unfinished")  # reached the sink with no status
    return [kept, edited, failed, stray]


def test_only_finished_rows_publish_an_image():
    records = {}
    for row in _rows():
        finalize_row(row)
        records[row["id"]] = safe_record(row)
    assert records["k"]["image"]["bytes"] == b"kept-bytes"
    assert records["e"]["image"]["bytes"] == b"edited-bytes"
    assert records["f"]["image"] is None and records["f"]["public_caption"] is None
    assert records["s"]["status"] == "error" and records["s"]["error"].startswith("pipeline: ")
    assert records["s"]["image"] is None
    assert all(set(r) == set(SAFE_SCHEMA.names) for r in records.values())


def test_prepare_outputs_refuses_to_clobber_unless_overwrite(tmp_path):
    output = OutputConfig(uri=str(tmp_path / "safe"), sensitive_uri=str(tmp_path / "private"))
    prepare_outputs(output, StorageConfig())
    (tmp_path / "safe" / "old.parquet").write_bytes(b"x")
    with pytest.raises(OutputExistsError, match="overwrite"):
        prepare_outputs(output, StorageConfig())
    prepare_outputs(output.model_copy(update={"overwrite": True}), StorageConfig())
    assert list((tmp_path / "safe").iterdir()) == []


def test_datasink_writes_both_tables_in_one_pass(ray_cluster, tmp_path):
    import ray.data

    output = OutputConfig(
        uri=str(tmp_path / "safe"), sensitive_uri=str(tmp_path / "private"), rows_per_file=2
    )
    storage = StorageConfig()
    prepare_outputs(output, storage)
    sink = SafeAndTripletsDatasink(output, storage)
    ray.data.from_arrow(rows_to_table(_rows())).write_datasink(sink)

    safe = pads.dataset(output.uri, format="parquet").to_table()
    private = pads.dataset(output.sensitive_uri, format="parquet").to_table()
    assert sorted(safe.column("id").to_pylist()) == ["e", "f", "k", "s"]
    assert sorted(private.column("id").to_pylist()) == ["e", "f"]  # flagged rows only
    assert "private_caption" not in safe.schema.names
    assert "huggingface" in {k.decode() for k in safe.schema.metadata}
    assert sink.summary.rows == 4 and sink.summary.triplets == 2
    assert sink.summary.by_status == {"kept": 1, "edited": 1, "error": 2}
    assert sink.summary.errors_by_stage == {"instruct": 1, "pipeline": 1}
    assert sink.summary.stage_rows == {"inspect": 2, "edit": 1}
    assert sink.summary.stage_seconds["edit"] == pytest.approx(2.0)


def test_run_record_is_json_beside_the_safe_table(tmp_path):
    uri = write_run_record(str(tmp_path), StorageConfig(), {"summary": {"rows": 1}})
    assert json.loads((tmp_path / "_run.json").read_text()) == {"summary": {"rows": 1}}
    assert uri.endswith("_run.json")

"""Sinks: one write pass produces both tables; unsafe rows never publish an image; files are named so
that a retried write task rewrites its own files; files close at a row or byte budget."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from u2s.config import OutputConfig, StorageConfig
from u2s.io.writers import (
    OutputExistsError,
    SafeAndSensitiveDatasink,
    finalize,
    prepare_outputs,
    safe_projection,
)
from u2s.schema import PRIVATE_COLUMNS, SAFE_SCHEMA, SENSITIVE_SCHEMA, new_row, rows_to_table, safe_schema


def _rows() -> list[dict]:
    kept = new_row("k", "/d/jane_doe.png", None, b"kept-bytes")
    kept.update(status="kept", privacy_flag=False, categories=[], timings={"inspect": 0.5})
    edited = new_row("e", "/d/e.png", "cat", b"edited-bytes")
    edited.update(
        status="edited", privacy_flag=True, categories=["health_indicators"], public_caption="a person",
        private_caption="Jane Doe at her desk", edit_instruction="change the hair", editor="x", seed=3,
        review=[{"item": "face", "reason": "identity", "category": "people"}],
        timings={"inspect": 0.5, "edit": 2.0}, metadata_removed=True,
    )  # fmt: skip
    failed = new_row("f", "/d/f.png", None, b"private-original")
    failed.update(privacy_flag=True, public_caption="half-done", private_caption="Jane Doe")
    failed.update(status="error", error="instruct: invalid output after retry")
    stray = new_row("s", "/d/s.png", None, b"unfinished")  # reached the sink with no status
    return [kept, edited, failed, stray]


def _output(tmp_path, **fields) -> OutputConfig:
    return OutputConfig(uri=str(tmp_path / "safe"), sensitive_uri=str(tmp_path / "private"), **fields)


def _read(uri: str) -> pa.Table:
    return pads.dataset(uri, format="parquet").to_table()


def test_only_finished_rows_publish_an_image_and_nothing_private():
    table = safe_projection(finalize(rows_to_table(_rows())), SAFE_SCHEMA)
    records = {row["id"]: row for row in table.to_pylist()}
    assert records["k"]["image"]["bytes"] == b"kept-bytes"
    assert records["e"]["image"]["bytes"] == b"edited-bytes"
    assert records["f"]["image"] is None and records["f"]["public_caption"] is None
    assert records["s"]["status"] == "error" and records["s"]["error"].startswith("pipeline: ")
    assert records["s"]["image"] is None
    assert table.schema == SAFE_SCHEMA
    assert not {"source", "categories", "timings", *PRIVATE_COLUMNS} & set(SAFE_SCHEMA.names)
    published = safe_schema(["source", "categories"]).names
    assert {"source", "categories"} <= set(published)


def test_prepare_outputs_refuses_to_clobber_unless_overwrite_or_resume(tmp_path, caplog):
    output = _output(tmp_path)
    assert prepare_outputs(output, StorageConfig()) is False
    (tmp_path / "safe" / "old.parquet").write_bytes(b"x")
    with pytest.raises(OutputExistsError, match="--resume"):
        prepare_outputs(output, StorageConfig())
    assert prepare_outputs(output, StorageConfig(), resume=True) is True
    assert (tmp_path / "safe" / "old.parquet").exists()
    with caplog.at_level("WARNING", logger="u2s.io.writers"):
        prepare_outputs(output.model_copy(update={"overwrite": True}), StorageConfig())
    assert list((tmp_path / "safe").iterdir()) == []
    said = [r.getMessage() for r in caplog.records if "replacing" in r.getMessage()]  # never silently
    assert said == [f"output.overwrite: replacing {output.uri} (deleting its 1 existing file(s))"]


def test_datasink_writes_both_tables_in_one_pass(ray_cluster, tmp_path):
    import ray.data

    output = _output(tmp_path, rows_per_file=2)
    storage = StorageConfig()
    prepare_outputs(output, storage)
    sink = SafeAndSensitiveDatasink(output, storage)
    ray.data.from_arrow(rows_to_table(_rows())).write_datasink(sink)

    safe, private = _read(output.uri), _read(output.sensitive_uri)
    assert sorted(safe.column("id").to_pylist()) == ["e", "f", "k", "s"]
    assert sorted(private.column("id").to_pylist()) == ["e", "f", "k", "s"]  # one row per input
    assert safe.schema.names == SAFE_SCHEMA.names and private.schema.names == SENSITIVE_SCHEMA.names
    assert "huggingface" in {k.decode() for k in safe.schema.metadata}
    by_id = {row["id"]: row for row in private.to_pylist()}
    assert by_id["k"]["source"] == "/d/jane_doe.png" and by_id["e"]["categories"] == ["health_indicators"]
    summary = sink.summary
    assert summary.rows == 4 and summary.triplets == 2 and summary.flagged == 2
    assert summary.metadata_removed == 1
    assert summary.by_status == {"kept": 1, "edited": 1, "error": 2}
    assert summary.errors_by_stage == {"instruct": 1, "pipeline": 1}
    assert summary.stage_rows == {"inspect": 2, "edit": 1}
    assert summary.stage_seconds["edit"] == pytest.approx(2.0)
    # Every safe file has a sensitive twin of the same name; nothing temporary is left behind.
    assert sorted(os.listdir(output.uri)) == sorted(os.listdir(output.sensitive_uri))
    assert all(name.endswith(".parquet") and not name.startswith(".") for name in os.listdir(output.uri))


def test_write_tasks_start_before_a_large_file_budget_fills_the_object_store(ray_cluster, tmp_path):
    """Finished blocks wait in the object store until a write's bundle fills; a bundle of the whole
    ``max_file_bytes`` (256 MiB) would hold back every row of a small-store run and fill its store."""
    import ray
    import ray.data

    from u2s.io.writers import STORE_SHARE_PER_WRITE

    store = ray.cluster_resources()["object_store_memory"]
    row_bytes = 2**20
    rows = int(2.5 * store / STORE_SHARE_PER_WRITE / row_bytes)  # two and a half bundles' worth
    tables = []
    for i in range(rows):
        row = new_row(f"r{i}", f"/d/{i}.png", None, os.urandom(row_bytes))
        row["status"] = "kept"
        tables.append(rows_to_table([row]))
    output = _output(tmp_path, rows_per_file=10_000)  # default max_file_bytes: 256 MiB, far above the rows
    assert output.max_file_bytes > rows * row_bytes
    prepare_outputs(output, StorageConfig())
    ray.data.from_arrow(tables).write_datasink(SafeAndSensitiveDatasink(output, StorageConfig()))

    files = sorted(os.listdir(output.uri))
    tasks = {name.split("-")[2] for name in files}  # part-{write id}-{task index}-{file}.parquet
    assert len(tasks) >= 2, files
    per_file = [pq.ParquetFile(f"{output.uri}/{name}").metadata.num_rows for name in files]
    assert sum(per_file) == rows and max(per_file) < rows
    assert sorted(_read(output.uri).column("id").to_pylist()) == sorted(f"r{i}" for i in range(rows))


class _Context:
    """What Ray hands a write task: its index and the write's kwargs (the write id among them)."""

    def __init__(self, task_idx: int, write_uuid: str) -> None:
        from ray.data._internal.planner.plan_write_op import WRITE_UUID_KWARG_NAME

        self.task_idx = task_idx
        self.kwargs = {WRITE_UUID_KWARG_NAME: write_uuid}


def test_a_retried_write_task_rewrites_its_own_files(tmp_path):
    output = _output(tmp_path, rows_per_file=3)
    prepare_outputs(output, StorageConfig())
    sink = SafeAndSensitiveDatasink(output, StorageConfig())
    blocks = [rows_to_table(_rows()), rows_to_table(_rows()[:2])]
    sink.write(blocks, _Context(7, "abc123"))
    first = sorted(os.listdir(output.uri))
    sink.write(blocks, _Context(7, "abc123"))  # Ray re-runs the task: same write id, same task index
    assert sorted(os.listdir(output.uri)) == first == ["part-abc123-000007-000.parquet",
                                                       "part-abc123-000007-001.parquet"]  # fmt: skip
    assert _read(output.uri).num_rows == 6 and _read(output.sensitive_uri).num_rows == 6
    sink.write(blocks, _Context(8, "abc123"))  # another task: other names
    assert len(os.listdir(output.uri)) == 4


def test_files_close_at_the_row_or_byte_budget(tmp_path):
    big = [new_row(f"r{i}", f"/d/{i}.png", None, os.urandom(300_000)) for i in range(10)]
    for row in big:
        row["status"] = "kept"
    output = _output(tmp_path, rows_per_file=4, max_file_bytes=2**20, row_group_bytes=2**16)
    prepare_outputs(output, StorageConfig())
    SafeAndSensitiveDatasink(output, StorageConfig()).write([rows_to_table(big)], _Context(0, "w"))
    files = sorted(os.listdir(output.uri))
    rows = [pq.ParquetFile(f"{output.uri}/{name}").metadata.num_rows for name in files]
    # 300 kB rows under a 1 MiB budget: a file closes after 4 rows by rows, after 4 by bytes (~1.2 MB).
    assert sum(rows) == 10 and max(rows) <= 4
    small = _output(tmp_path / "small", rows_per_file=1000, max_file_bytes=2**20, row_group_bytes=2**16)
    prepare_outputs(small, StorageConfig())
    SafeAndSensitiveDatasink(small, StorageConfig()).write([rows_to_table(big)], _Context(0, "w"))
    sizes = [os.path.getsize(f"{small.uri}/{name}") for name in sorted(os.listdir(small.uri))]
    assert len(sizes) >= 3 and max(sizes) < 2 * 2**20  # by bytes, not the 1000-row limit

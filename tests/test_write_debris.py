"""Writes leave no debris: a retried write task removes its earlier attempt's files, a failed upload
publishes nothing under a final name, and ``--resume`` drops files without a valid Parquet footer.

Uploads go to a real S3 server (moto); the end-to-end faults run the real pipeline on a local Ray.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from u2s.config import OutputConfig, StorageConfig, load_config
from u2s.io.storage import filesystem
from u2s.io.writers import (
    FAULT_AFTER_COMMIT,
    SafeAndSensitiveDatasink,
    parquet_files,
    prepare_outputs,
    read_columns,
)
from u2s.pipeline import run
from u2s.resume import reconcile
from u2s.schema import new_row, rows_to_table
from u2s.testing.images import noise_image

IMAGES = 8


class _Context:
    """What Ray hands a write task: its index and the write's kwargs (the write id among them)."""

    def __init__(self, task_idx: int, write_uuid: str) -> None:
        from ray.data._internal.planner.plan_write_op import WRITE_UUID_KWARG_NAME

        self.task_idx = task_idx
        self.kwargs = {WRITE_UUID_KWARG_NAME: write_uuid}


def _rows(n: int, prefix: str = "r", size: int = 2000) -> list[dict]:
    rows = [new_row(f"{prefix}{i}", f"/d/{prefix}{i}.png", None, os.urandom(size)) for i in range(n)]
    for row in rows:
        row["status"] = "kept"
    return rows


def _names(uri: str, storage: StorageConfig) -> list[str]:
    """Every object or file under ``uri``, hidden ones included."""
    fs, root = filesystem(uri, storage)
    fs.invalidate_cache(root)
    return sorted(p.rsplit("/", 1)[-1] for p in fs.find(root))


def _output(root: str, **fields) -> OutputConfig:
    return OutputConfig(uri=f"{root}/safe", sensitive_uri=f"{root}/sensitive", **fields)


def _s3(s3_endpoint: str) -> StorageConfig:
    return StorageConfig(endpoint_url=s3_endpoint)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_retry_that_splits_rows_differently_leaves_none_of_the_first_attempts_files(
    where, tmp_path, s3_bucket, s3_endpoint
):
    root, storage = (str(tmp_path), StorageConfig()) if where == "local" else (s3_bucket, _s3(s3_endpoint))
    prepare_outputs(_output(root, rows_per_file=1), storage)
    blocks = [rows_to_table(_rows(3))]
    SafeAndSensitiveDatasink(_output(root, rows_per_file=1), storage).write(blocks, _Context(5, "w"))
    if where == "local":
        (tmp_path / "safe" / ".part-w-000005-007.parquet.tmp").write_bytes(b"PAR1 half")  # a killed attempt
    assert len(_names(f"{root}/safe", storage)) == 3 + (where == "local")
    other = SafeAndSensitiveDatasink(_output(root, rows_per_file=10), storage)
    other.write([rows_to_table(_rows(1, "x"))], _Context(6, "w"))  # another task's files stay
    other.write(blocks, _Context(5, "w"))  # the retry: one file of 3 rows
    expected = ["part-w-000005-000.parquet", "part-w-000006-000.parquet"]
    for table in ("safe", "sensitive"):
        assert _names(f"{root}/{table}", storage) == expected
    ids = read_columns(f"{root}/safe", storage, ["id"]).column("id").to_pylist()
    assert sorted(ids) == ["r0", "r1", "r2", "x0"]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_write_failing_mid_file_publishes_nothing_under_a_final_name(
    where, tmp_path, s3_bucket, s3_endpoint, monkeypatch
):
    root, storage = (str(tmp_path), StorageConfig()) if where == "local" else (s3_bucket, _s3(s3_endpoint))
    output = _output(root, rows_per_file=4, row_group_bytes=2**16)  # a row group per block: bytes go out
    prepare_outputs(output, storage)
    marker = tmp_path / "fault"
    monkeypatch.setenv(FAULT_AFTER_COMMIT, f"fail-mid-file:{marker}")
    sink = SafeAndSensitiveDatasink(output, storage)
    with pytest.raises(RuntimeError, match="mid-file"):  # a row group of a 4-row pair written, then fails
        sink.write([rows_to_table(_rows(3, size=2**17))], _Context(0, "w"))
    assert marker.read_text() == "part-w-000000"
    for uri in (output.uri, output.sensitive_uri):
        assert _names(uri, storage) == []  # neither the final name nor a temporary
    if where == "s3":  # its multipart uploads were aborted, not left pending
        import boto3

        bucket = s3_bucket.removeprefix("s3://")
        pending = boto3.client("s3", endpoint_url=s3_endpoint).list_multipart_uploads(Bucket=bucket)
        assert not pending.get("Uploads")


@pytest.mark.parametrize("broken", ["safe", "sensitive"])
def test_resume_drops_files_without_a_valid_footer_and_their_twins(broken, s3_bucket, s3_endpoint):
    storage = _s3(s3_endpoint)
    output = _output(s3_bucket, rows_per_file=2)
    prepare_outputs(output, storage)
    SafeAndSensitiveDatasink(output, storage).write([rows_to_table(_rows(6))], _Context(0, "w"))
    fs, root = filesystem(getattr(output, "uri" if broken == "safe" else "sensitive_uri"), storage)
    path = f"{root}/part-w-000000-001.parquet"
    whole = fs.cat_file(path)
    fs.pipe_file(path, whole[: len(whole) // 2])  # an object cut short: no footer
    state = reconcile(output, storage)
    assert sorted(state.done.to_pylist()) == ["r0", "r1", "r4", "r5"]
    for uri in (output.uri, output.sensitive_uri):
        assert parquet_files(uri, storage) == ["part-w-000000-000.parquet", "part-w-000000-002.parquet"]


# -- the pipeline --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("debris-images")
    for i in range(IMAGES):
        noise_image(128, 128, seed=i).save(folder / f"{i:03d}.png")
    return folder


def _config(tiny_models, images: Path, out: str, *extra: str):
    return load_config(preset="cpu-tiny", overrides=[
        f"input.uri={images}", f"output.uri={out}/safe", f"output.sensitive_uri={out}/sensitive",
        "output.overwrite=false", "output.rows_per_file=4", f"output.row_group_bytes={2**16}",
        f"stage1.vlm.model={tiny_models['vlm']}", f"stage1.llm.model={tiny_models['llm']}",
        "stage1.calls.inspect.generation.max_new_tokens=16",
        "stage1.calls.describe.generation.max_new_tokens=8",
        "stage2.editor=blur_image", *extra,
    ])  # fmt: skip


def _assert_exactly_once(cfg) -> None:
    ids = {}
    for uri in (cfg.output.uri, cfg.output.sensitive_uri):
        ids[uri] = read_columns(uri, cfg.storage, ["id"]).column("id").to_pylist()
        assert len(ids[uri]) == len(set(ids[uri])) == IMAGES
        fs, root = filesystem(uri, cfg.storage)
        for name in parquet_files(uri, cfg.storage):
            with fs.open(f"{root}/{name}", "rb") as f:
                pq.read_metadata(f)  # every committed file whole
    assert set(ids[cfg.output.uri]) == set(ids[cfg.output.sensitive_uri])


@pytest.mark.slow
def test_a_write_worker_killed_mid_upload_is_retried_without_debris(
    ray_cluster, tiny_models, images, s3_bucket, s3_endpoint, tmp_path, monkeypatch
):
    """The first write task's worker exits (``os._exit``) with both files of a pair half uploaded; Ray
    re-runs the task: every row once, every object whole, no upload left pending."""
    import boto3

    marker = tmp_path / "fault"
    monkeypatch.setenv(FAULT_AFTER_COMMIT, f"exit-mid-file:{marker}")
    cfg = _config(tiny_models, images, f"{s3_bucket}/run", f"storage.endpoint_url={s3_endpoint}")
    summary = run(cfg)
    assert marker.read_text().startswith("part-"), "the fault hook never fired"
    assert summary.rows == IMAGES
    _assert_exactly_once(cfg)
    for uri in (cfg.output.uri, cfg.output.sensitive_uri):  # no temporary, no half-written part
        assert not [n for n in _names(uri, cfg.storage) if n.startswith(".") or n.endswith(".tmp")]
    bucket = s3_bucket.removeprefix("s3://")
    pending = boto3.client("s3", endpoint_url=s3_endpoint).list_multipart_uploads(Bucket=bucket)
    assert not pending.get("Uploads")

"""``--resume --retry-errors``: the error rows of a finished run are processed again and replaced, every
id once in both tables, whatever point a crash stops the replacement at.

The first run meets two unreadable input files (decode error rows); they are fixed in place (same paths,
so the same ids and input fingerprint), then the run is resumed with ``retry_errors``. Stage 1 runs on the
oracle chat server (every image kept), the editor is the model-free whole-image blur: each run is cheap.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from u2s.config import JobConfig, load_config
from u2s.io.writers import parquet_files, read_columns
from u2s.pipeline import run
from u2s.resume import reconcile
from u2s.testing.chat_server import ChatRequest, OracleChatServer, oracle_overrides
from u2s.testing.images import noise_image

IMAGES = 6
BROKEN = ("001.png", "004.png")


def _answer(request: ChatRequest) -> dict:
    return {"privacy_flag": False, "categories": []}


def _config(images: Path, out: Path, chat_url: str) -> JobConfig:
    return load_config(
        preset="cpu-tiny",
        overrides=[
            f"input.uri={images}",
            f"output.uri={out}/safe",
            f"output.sensitive_uri={out}/sensitive",
            "output.rows_per_file=2",
            *oracle_overrides(chat_url),
            "stage1.image_size=32",
            "stage2.editor=blur_image",
        ],
    )


def _tables(cfg: JobConfig) -> tuple[dict[str, str], dict[str, str]]:
    """id → status of the safe and the sensitive table; fails on a duplicate id."""
    tables = []
    for uri in (cfg.output.uri, cfg.output.sensitive_uri):
        table = read_columns(uri, cfg.storage, ["id", "status"])
        ids = table.column("id").to_pylist()
        assert len(ids) == len(set(ids)), f"duplicate ids in {uri}"
        tables.append(dict(zip(ids, table.column("status").to_pylist(), strict=True)))
    return tables[0], tables[1]


@pytest.fixture(scope="module")
def first_run(ray_cluster, tmp_path_factory):
    """A finished run with two error rows, and a copy of its outputs as they were."""
    root = tmp_path_factory.mktemp("retry")
    images = root / "images"
    images.mkdir()
    for i in range(IMAGES):
        noise_image(40, 40, seed=i).save(images / f"{i:03d}.png")
    for name in BROKEN:
        (images / name).write_bytes(b"not an image at all")
    with OracleChatServer(_answer) as url:
        cfg = _config(images, root / "out", url)
        summary = run(cfg)
    assert summary.by_status == {"kept": IMAGES - len(BROKEN), "error": len(BROKEN)}
    shutil.copytree(root / "out", root / "snapshot")
    return {"root": root, "images": images, "cfg": cfg}


def _copy(first_run, name: str) -> JobConfig:
    out = first_run["root"] / name
    shutil.copytree(first_run["root"] / "snapshot", out)
    cfg = first_run["cfg"]
    return cfg.model_copy(update={"output": cfg.output.model_copy(update={
        "uri": f"{out}/safe", "sensitive_uri": f"{out}/sensitive"})})  # fmt: skip


def test_a_crash_at_any_point_of_the_replacement_leaves_every_id_once(first_run):
    """The three states a crash can leave (see u2s.resume), made from a real replacement's files."""
    done = _copy(first_run, "replaced")
    state = reconcile(done.output, done.storage, retry_errors=True)
    assert state.retried == len(BROKEN) and len(state.done) == IMAGES - len(BROKEN)
    safe, sensitive = _tables(done)
    assert safe == sensitive and set(safe.values()) == {"kept"}
    new = [n for n in parquet_files(done.output.uri, done.storage) if ".r1." in n]
    assert new, "no pair was rewritten"
    replaced = {Path(done.output.uri, n) for n in new} | {Path(done.output.sensitive_uri, n) for n in new}

    def crashed_after(name: str, *written: str) -> JobConfig:
        cfg = _copy(first_run, name)
        for path in replaced:
            if path.parent.name in written:
                target = Path(cfg.output.uri if path.parent.name == "safe" else cfg.output.sensitive_uri)
                shutil.copy(path, target / path.name)
        return cfg

    # 1: the new sensitive file landed, not its safe twin: the old pairs stand, errors included.
    # 2: both new files landed, the old pair not yet deleted: the new pair supersedes it.
    # 3: as 2, and the old safe file is gone: its sensitive twin is an orphan.
    for cfg, errors_left in (
        (crashed_after("crash-1", "sensitive"), len(BROKEN)),
        (crashed_after("crash-2", "sensitive", "safe"), 0),
    ):
        state = reconcile(cfg.output, cfg.storage)
        safe, sensitive = _tables(cfg)
        assert safe == sensitive and len(safe) == IMAGES - len(BROKEN) + errors_left
        assert list(safe.values()).count("error") == errors_left
        assert parquet_files(cfg.output.uri, cfg.storage) == parquet_files(
            cfg.output.sensitive_uri, cfg.storage
        )
    cfg = crashed_after("crash-3", "sensitive", "safe")
    for name in new:
        Path(cfg.output.uri, name.replace(".r1.", ".")).unlink()
    reconcile(cfg.output, cfg.storage)
    safe, sensitive = _tables(cfg)
    assert safe == sensitive and set(safe.values()) == {"kept"} and len(safe) == IMAGES - len(BROKEN)


def test_retry_errors_processes_the_error_rows_again_and_replaces_them_once(first_run):
    cfg, images = first_run["cfg"], first_run["images"]
    for i, name in enumerate(BROKEN):  # fixed in place: same paths, same ids, same input fingerprint
        noise_image(40, 40, seed=100 + i).save(images / name)
    with OracleChatServer(_answer) as url:
        summary = run(
            cfg.model_copy(update={"stage1": cfg.stage1.model_copy(update={
                "http": cfg.stage1.http.model_copy(update={"base_url": url})})}),  # a runtime setting
            resume=True, retry_errors=True,
        )  # fmt: skip
    assert summary.rows == IMAGES and summary.by_status == {"kept": IMAGES}
    assert summary.retried == len(BROKEN) and summary.written == len(BROKEN)
    assert summary.resumed == IMAGES - len(BROKEN)
    safe, sensitive = _tables(cfg)
    assert safe == sensitive and len(safe) == IMAGES and set(safe.values()) == {"kept"}
    errors = read_columns(cfg.output.uri, cfg.storage, ["error"]).column("error")
    assert errors.null_count == IMAGES
    record = json.loads(Path(cfg.output.sensitive_uri, "_run.json").read_text())
    assert [a["status"] for a in record["attempts"]] == ["succeeded", "succeeded"]
    assert record["attempts"][-1]["retried"] == len(BROKEN) and record["summary"]["retried"] == len(BROKEN)


def test_error_rows_leave_both_tables_on_s3_and_only_their_pairs_are_rewritten(s3_endpoint, s3_bucket):
    """The real sink writes three pairs to the S3 server, two of them holding an error row each."""
    from ray.data._internal.planner.plan_write_op import WRITE_UUID_KWARG_NAME

    from u2s.config import OutputConfig, StorageConfig
    from u2s.io.writers import SafeAndSensitiveDatasink, prepare_outputs
    from u2s.schema import new_row, rows_to_table

    class Context:  # what Ray hands a write task
        task_idx, kwargs = 0, {WRITE_UUID_KWARG_NAME: "w"}

    storage = StorageConfig(endpoint_url=s3_endpoint)
    output = OutputConfig(uri=f"{s3_bucket}/safe", sensitive_uri=f"{s3_bucket}/sensitive", rows_per_file=2)
    prepare_outputs(output, storage)
    rows = [new_row(f"r{i}", f"/d/r{i}.png", None, b"x" * 100) for i in range(IMAGES)]
    for i, row in enumerate(rows):
        failed = i in (1, 4)
        row.update(
            status="error" if failed else "kept", error="decode: UnidentifiedImageError" if failed else None
        )
    SafeAndSensitiveDatasink(output, storage).write([rows_to_table(rows)], Context())
    state = reconcile(output, storage, retry_errors=True)
    assert state.retried == 2 and sorted(state.done.to_pylist()) == ["r0", "r2", "r3", "r5"]
    expected = ["part-w-000000-000.r1.parquet", "part-w-000000-001.parquet", "part-w-000000-002.r1.parquet"]
    for uri in (output.uri, output.sensitive_uri):
        assert parquet_files(uri, storage) == expected
        table = read_columns(uri, storage, ["id", "status"])
        assert sorted(table.column("id").to_pylist()) == ["r0", "r2", "r3", "r5"]
        assert set(table.column("status").to_pylist()) == {"kept"}


def test_retry_errors_needs_resume():
    from u2s.cli import app

    result = CliRunner().invoke(app, ["run", "--preset", "cpu-tiny", "--retry-errors"])
    assert result.exit_code == 2 and "--resume" in result.output
    with pytest.raises(ValueError, match="resume"):
        run(load_config(preset="cpu-tiny"), retry_errors=True)

"""A small driver: the exactly-once check counts both tables in Ray tasks (digests, never rows) and still
fails on a doubled or missing row; ``--resume``'s finished ids are prepared once per worker.

The driver's peak memory over a whole run is measured by ``bench/driver_memory.py``.
"""

from __future__ import annotations

import pyarrow as pa
import pytest

from u2s.config import load_config
from u2s.io.listing import _fingerprint
from u2s.io.readers import _done_lookup, drop_done
from u2s.io.writers import SafeAndSensitiveDatasink, count_outputs, prepare_outputs
from u2s.pipeline import JobFailed, verify_outputs
from u2s.schema import new_row, rows_to_table


class _Context:
    def __init__(self, task_idx: int) -> None:
        from ray.data._internal.planner.plan_write_op import WRITE_UUID_KWARG_NAME

        self.task_idx = task_idx
        self.kwargs = {WRITE_UUID_KWARG_NAME: "w"}


def _cfg(tmp_path):
    return load_config(preset="cpu-tiny", overrides=[
        f"input.uri={tmp_path}", f"output.uri={tmp_path}/safe", f"output.sensitive_uri={tmp_path}/sensitive",
        "output.rows_per_file=2",
    ])  # fmt: skip


def _write(cfg, ids: list[str]) -> None:
    rows = [new_row(i, f"/d/{i}.png", None, b"x") for i in ids]
    for row in rows:
        row.update(status="kept", privacy_flag=False, timings={"inspect": 0.5})
    prepare_outputs(cfg.output, cfg.storage)
    SafeAndSensitiveDatasink(cfg.output, cfg.storage).write([rows_to_table(rows)], _Context(0))


def _listed(ids: list[str]) -> str:
    return f"{len(ids)}:{_fingerprint(ids, [f'/d/{i}.png' for i in ids]):016x}"


def test_the_check_counts_in_tasks_and_passes_a_whole_output(ray_cluster, tmp_path):
    cfg = _cfg(tmp_path)
    ids = [f"r{i}" for i in range(5)]
    _write(cfg, ids)
    counts = verify_outputs(cfg, 5, _listed(ids))
    assert counts["rows"] == 5 and counts["by_status"] == {"kept": 5}
    assert counts["stage_rows"] == {"inspect": 5} and counts["stage_seconds"] == {"inspect": 2.5}
    safe, sensitive = count_outputs(cfg.output, cfg.storage, files_per_task=1)  # 3 files: 3 tasks each
    assert safe.rows == sensitive.rows == 5 and safe.ids == sensitive.ids


def test_a_doubled_row_next_to_a_missing_one_fails_the_check(ray_cluster, tmp_path):
    cfg = _cfg(tmp_path)
    _write(cfg, ["r0", "r1", "r1", "r3"])  # r2 missing, r1 twice: the row count is right
    with pytest.raises(JobFailed, match="exactly-once check failed: the tables' ids"):
        verify_outputs(cfg, 4, _listed(["r0", "r1", "r2", "r3"]))
    with pytest.raises(JobFailed, match="safe table: 4 rows, 5 expected"):
        verify_outputs(cfg, 5, _listed(["r0", "r1", "r2", "r3", "r4"]))


def test_finished_ids_are_prepared_once_per_worker_and_dropped_exactly(ray_cluster):
    import ray

    done = pa.array(["x"] + [f"id{i:018d}" for i in range(0, 60, 3)]).slice(1)  # a slice, as Arrow gives
    ref = ray.put(done)
    assert _done_lookup(ref) is _done_lookup(ref)  # built once, then reused
    batch = pa.table({"id": [f"id{i:018d}" for i in range(10)] + ["id", f"id{3:018d}x"]})
    kept = drop_done(batch, ref).column("id").to_pylist()
    assert kept == [f"id{i:018d}" for i in (1, 2, 4, 5, 7, 8)] + ["id", f"id{3:018d}x"]
    mixed = pa.array(["a", "bb", "ccc"])  # ids of different lengths: a hash lookup instead
    assert drop_done(pa.table({"id": ["a", "b", "ccc", "cc"]}), mixed).column("id").to_pylist() == ["b", "cc"]

"""Faults a multi-day run meets, injected for real: a write task's worker dies after its file landed, a
stage actor is killed mid-run, the driver is SIGKILLed (then ``--resume``), the object store goes away
for a few seconds. Each time, every input id ends up exactly once in both tables.

All runs use the real local Ray cluster and tiny models; the cheap config keeps each run short: a short
describe budget (flagged rows end as error rows, which is fine here: what is checked is that every row
arrives once, with a final status) and the whole-image blur editor.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from u2s.config import JobConfig, dump_config, load_config
from u2s.io.writers import FAULT_AFTER_COMMIT, parquet_files, read_columns
from u2s.pipeline import run
from u2s.testing.images import noise_image
from u2s.testing.tcp_proxy import TcpProxy

pytestmark = pytest.mark.slow

IMAGES = 16


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Noise images of ~200 kB, so a 1 MiB write budget splits the output into several write tasks."""
    folder = tmp_path_factory.mktemp("fault-images")
    for i in range(IMAGES):
        noise_image(256, 256, seed=i).save(folder / f"{i:03d}.png")
    return folder


def _config(tiny_models, images: Path, out: Path | str, *extra: str) -> JobConfig:
    return load_config(
        preset="cpu-tiny",
        overrides=[
            f"input.uri={images}",
            f"output.uri={out}/safe",
            f"output.sensitive_uri={out}/sensitive",
            "output.overwrite=false",
            "output.rows_per_file=4",
            f"output.max_file_bytes={2**20}",
            f"stage1.vlm.model={tiny_models['vlm']}",
            f"stage1.llm.model={tiny_models['llm']}",
            "stage1.calls.inspect.generation.max_new_tokens=128",
            "stage1.calls.describe.generation.max_new_tokens=8",
            "stage2.editor=blur_image",
            *extra,
        ],
    )


def _ids(uri: str, storage) -> list[str]:
    return read_columns(uri, storage, ["id"]).column("id").to_pylist()


def assert_exactly_once(cfg: JobConfig, expected: int = IMAGES) -> None:
    """Every input id once in each table, every row with a final status, the records agreeing."""
    safe = read_columns(cfg.output.uri, cfg.storage, ["id", "status"])
    sensitive = read_columns(cfg.output.sensitive_uri, cfg.storage, ["id", "status"])
    for table in (safe, sensitive):
        ids = table.column("id").to_pylist()
        assert len(ids) == len(set(ids)) == expected
        assert table.column("status").null_count == 0
        assert set(table.column("status").to_pylist()) <= {"kept", "edited", "error"}
    assert set(safe.column("id").to_pylist()) == set(sensitive.column("id").to_pylist())
    assert sorted(parquet_files(cfg.output.uri, cfg.storage)) == sorted(
        parquet_files(cfg.output.sensitive_uri, cfg.storage)
    )
    public = (
        json.loads(Path(cfg.output.uri, "_run.json").read_text()) if "://" not in cfg.output.uri else None
    )
    if public is not None:
        counts = pc.value_counts(safe.column("status")).to_pylist()
        assert public["summary"]["rows"] == expected
        assert public["summary"]["by_status"] == {c["values"]: c["counts"] for c in counts}


def test_a_write_task_dying_after_its_file_landed_duplicates_nothing(
    ray_cluster, tiny_models, images, tmp_path, monkeypatch
):
    marker = tmp_path / "fault-fired"
    monkeypatch.setenv(FAULT_AFTER_COMMIT, f"exit:{marker}")
    cfg = _config(tiny_models, images, tmp_path / "out")
    summary = run(cfg)
    assert marker.exists(), "the fault hook never fired"
    assert summary.rows == IMAGES
    assert_exactly_once(cfg)


def _pool_actor_pids(class_fragment: str) -> list[int]:
    """PIDs of this session's actors of a pool, by their process title (``ray::MapWorker(...)``).

    Only descendants of this test process count (its local Ray cluster), never another cluster's.
    """
    import psutil

    pids = []
    for proc in psutil.Process().children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if class_fragment in title and title.startswith("ray::"):
            pids.append(proc.pid)
    return pids


def test_a_stage_actor_killed_mid_run_loses_and_doubles_nothing(ray_cluster, tiny_models, images, tmp_path):
    cfg = _config(tiny_models, images, tmp_path / "out")
    earlier = set(_pool_actor_pids("VisionCallPool"))  # an earlier run's actors may still be exiting
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(summary=run(cfg)), daemon=True)
    runner.start()
    killed, seen = None, None
    deadline = time.monotonic() + 300
    while killed is None and runner.is_alive() and time.monotonic() < deadline:
        pids = [pid for pid in _pool_actor_pids("VisionCallPool") if pid not in earlier]
        if pids and seen is None:
            seen = time.monotonic()
        if pids and time.monotonic() - seen >= 3:  # loaded, and a batch or two taken
            try:
                os.kill(pids[0], signal.SIGKILL)  # the OOM killer's way: no goodbye; Ray restarts it
                killed = pids[0]
            except ProcessLookupError:  # gone between the scan and the kill: look again
                pass
        time.sleep(0.2)
    runner.join(timeout=600)
    assert killed is not None, "no VLM pool actor was ever seen alive"
    assert "summary" in result, "the run did not finish after its actor was killed"
    assert_exactly_once(cfg)


def _driver(cfg_path: Path, address: str, *extra: str, hang_after: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": address}
    if hang_after is not None:  # writes stop after the first committed file pair, until the kill
        env[FAULT_AFTER_COMMIT] = f"hang:{hang_after}"
    command = [sys.executable, "-m", "u2s.cli", "run", "--config", str(cfg_path), *extra]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_killed_driver_resumes_where_its_files_end(ray_cluster, tiny_models, images, tmp_path):
    import ray

    cfg = _config(tiny_models, images, tmp_path / "out")
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(dump_config(cfg))
    address = ray.get_runtime_context().gcs_address
    marker = tmp_path / "first-commit"
    driver = _driver(cfg_path, address, hang_after=marker)
    deadline = time.monotonic() + 300
    while not marker.exists() and driver.poll() is None:
        assert time.monotonic() < deadline, "no file was ever committed"
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    before = {name: None for name in parquet_files(cfg.output.uri, cfg.storage)}
    finished = set(_ids(cfg.output.uri, cfg.storage))
    assert 0 < len(finished) < IMAGES, "kill the driver mid-run, not before or after"

    refused = _driver(cfg_path, address)  # the outputs hold data: a plain rerun refuses to touch them
    assert refused.wait(timeout=300) == 2 and "--resume" in refused.stdout.read()
    resumed = _driver(cfg_path, address, "--resume")
    output = resumed.communicate(timeout=900)[0]
    assert resumed.returncode == 0, output
    assert_exactly_once(cfg)
    # Rows finished before the kill were not processed again: the resumed attempt's files hold exactly
    # the others, and its record says how many it skipped.
    new_files = [name for name in parquet_files(cfg.output.uri, cfg.storage) if name not in before]
    root = cfg.output.sensitive_uri
    new_ids = [
        i for name in new_files for i in pq.read_table(f"{root}/{name}", columns=["id"])["id"].to_pylist()
    ]
    assert len(new_ids) == IMAGES - len(finished) and not set(new_ids) & finished
    record = json.loads(Path(root, "_run.json").read_text())
    assert [a["status"] for a in record["attempts"]] == ["running", "succeeded"]
    assert record["summary"]["resumed"] == len(finished)
    assert record["attempts"][-1]["written"] == IMAGES - len(finished)


def test_an_object_store_outage_is_ridden_out_or_resumed(ray_cluster, tiny_models, images, s3_endpoint):
    import boto3

    from u2s.pipeline import JobFailed

    proxy = TcpProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    proxy.start()
    endpoint = f"http://127.0.0.1:{proxy.port}"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for bucket in ("outage-in", "outage-out"):
        s3.create_bucket(Bucket=bucket)
    for path in sorted(images.iterdir()):
        s3.upload_file(str(path), "outage-in", f"images/{path.name}")
    cfg = _config(
        tiny_models, "s3://outage-in/images", "s3://outage-out/run", f"storage.endpoint_url={endpoint}",
        "storage.max_attempts=6", "storage.connect_timeout=2", "storage.read_timeout=5",
    )  # fmt: skip
    result: dict = {}

    def job() -> None:
        try:
            result["summary"] = run(cfg)
        except JobFailed as e:
            result["failed"] = str(e)

    runner = threading.Thread(target=job, daemon=True)
    runner.start()
    deadline = time.monotonic() + 300
    while runner.is_alive() and not _pool_actor_pids("VisionCallPool"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    proxy.stop()  # the store goes away mid-run for a few seconds...
    time.sleep(4)
    proxy.start()  # ...and comes back
    runner.join(timeout=900)
    assert result, "the run neither finished nor failed"
    if "failed" in result:  # a clear message, and --resume finishes it
        assert "--resume" in result["failed"]
        run(cfg, resume=True)
    safe = read_columns(cfg.output.uri, cfg.storage, ["id", "error"])
    assert len(set(safe.column("id").to_pylist())) == safe.num_rows == IMAGES
    # Connection trouble is retried, never recorded as a row's reason.
    errors = [e for e in safe.column("error").to_pylist() if e and e.startswith("read:")]
    assert errors == []
    sensitive = read_columns(cfg.output.sensitive_uri, cfg.storage, ["id"])
    assert set(sensitive.column("id").to_pylist()) == set(safe.column("id").to_pylist())
    proxy.stop()

"""`u2s run` as a user runs it (a subprocess, its own local Ray): how it ends when it is stopped (Ctrl-C,
`kill`) part-way, how `--resume` finishes it, and what it prints while it works."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from u2s.config import StorageConfig
from u2s.demo_data import write_sample_dataset
from u2s.io.writers import FAULT_AFTER_COMMIT, parquet_files, read_columns
from u2s.testing.chat_server import ChatRequest, OracleChatServer, oracle_overrides
from u2s.testing.cluster_job import tiny_model_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("samples")
    write_sample_dataset(root)
    return root


def _command(tiny_models, samples: Path, out: Path, *extra: str) -> list[str]:
    command = [sys.executable, "-m", "u2s.cli", "run", "--preset", "cpu-tiny", "--input", str(samples),
               "--output", str(out / "safe"), "--sensitive-output", str(out / "sensitive"),
               "--set", "ray.num_cpus=2"]  # fmt: skip
    for item in tiny_model_overrides(tiny_models):
        command += ["--set", item]
    return [*command, *extra]  # later settings win


def _env() -> dict[str, str]:
    """The user's environment: without the suite's Ray Data tuning for its in-process cluster."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_DATA_")}


def _records(out: Path) -> tuple[dict, dict]:
    full = json.loads((out / "sensitive" / "_run.json").read_text())
    public = json.loads((out / "safe" / "_run.json").read_text())
    return full, public


def _nothing_private(request: ChatRequest) -> dict:
    return {"privacy_flag": False, "categories": []}


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_a_stopped_run_says_interrupted_and_resume_finishes_it(tiny_models, samples, tmp_path, stop):
    extra = ["--set", "output.rows_per_file=4"]
    with contextlib.ExitStack() as stack:
        if stop == signal.SIGTERM:  # how it ends is what counts here: stage 1 on an instant stand-in server
            url = stack.enter_context(OracleChatServer(_nothing_private))
            extra += [item for override in oracle_overrides(url) for item in ("--set", override)]
            extra += ["--set", "stage2.editor=blur"]
        _stop_and_resume(tiny_models, samples, tmp_path, stop, extra)


def _stop_and_resume(
    tiny_models, samples: Path, tmp_path: Path, stop: signal.Signals, extra: list[str]
) -> None:
    command = _command(tiny_models, samples, tmp_path, *extra)
    # The test-only write fault hook: the first write task commits one file pair, then every write hangs,
    # so the signal arrives with files written and rows left (u2s.io.writers.FAULT_AFTER_COMMIT).
    marker = tmp_path / "committed"
    env = {**_env(), FAULT_AFTER_COMMIT: f"hang:{marker}"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 600
    while not marker.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.5)
    assert parquet_files(str(tmp_path / "safe"), StorageConfig())
    process.send_signal(stop)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stdout[-2000:] + stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("u2s run: interrupted after writing ") and last.endswith(
        "rerun the same command with --resume to finish"
    ), stderr[-3000:]
    full, public = _records(tmp_path)
    assert [a["status"] for a in full["attempts"]] == ["interrupted"]
    assert [a["status"] for a in public["attempts"]] == ["interrupted"]
    if stop == signal.SIGTERM:
        return  # the resume below is the same for both signals

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=900, env=_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full, public = _records(tmp_path)
    assert [a["status"] for a in full["attempts"]] == ["interrupted", "succeeded"]
    ids = read_columns(str(tmp_path / "safe"), StorageConfig(), ["id"]).column("id").to_pylist()
    rows = full["summary"]["rows"]
    assert len(ids) == len(set(ids)) == rows  # every row once

    # What the resumed run printed while it worked: u2s's own progress line, not the libraries' output.
    progress = [line for line in resumed.stderr.splitlines() if line.startswith("u2s: ")]
    assert progress and progress[-1].startswith(f"u2s: {rows}/{rows} rows (100%)")
    assert "busy s/row" in progress[-1]
    printed = resumed.stdout + resumed.stderr
    for noise in ("logging_progress", "Execution plan", "requires torchvision", "Loading weights",
                  "The Dataset job will hang", "Writing model shards", "is deprecated",
                  "constructor arguments in the object store"):  # fmt: skip
        assert noise not in printed, noise
    assert len(printed.splitlines()) < 40, printed

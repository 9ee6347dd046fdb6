"""What a new user meets first, through the CLI as they run it: each problem found before Ray starts is one
line on stderr (no traceback) that names the fix, with exit status 2."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from u2s.testing.cluster_job import tiny_model_overrides


def _u2s(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "u2s.cli", *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=120, env=env or dict(os.environ), cwd=cwd
    )


def _one_line(done: subprocess.CompletedProcess) -> str:
    """The failure's stderr, checked to be one line from u2s without a traceback, and no Ray started."""
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "--resume" not in done.stderr
    assert "Started a local Ray instance" not in done.stderr + done.stdout
    return lines[0]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_args(input: str, output: str, tmp_path: Path, tiny_models: dict | None = None) -> list[str]:
    """`u2s run --preset cpu-tiny` arguments (the sensitive table under ``tmp_path``), with the suite's
    tiny models when given."""
    args = ["run", "--preset", "cpu-tiny", "--input", input, "--output", output,
            "--sensitive-output", str(tmp_path / "sensitive")]  # fmt: skip
    for item in tiny_model_overrides(tiny_models) if tiny_models else []:
        args += ["--set", item]
    return args


def test_missing_tiny_models_name_the_command_that_builds_them(tmp_path):
    missing = tmp_path / "tiny-models"
    env = {**os.environ, "U2S_TINY_MODELS": str(missing)}
    line = _one_line(_u2s(*_run_args(str(tmp_path), str(tmp_path / "safe"), tmp_path), env=env, cwd=tmp_path))
    assert line.startswith("u2s run: stage1.vlm.model: no model folder at")
    assert f"`u2s tiny-models {missing}`" in line
    assert not (tmp_path / "safe").exists()  # nothing was made


def test_a_missing_input_folder_is_one_line(tiny_models, tmp_path):
    args = _run_args(str(tmp_path / "no-such-folder"), str(tmp_path / "safe"), tmp_path, tiny_models)
    line = _one_line(_u2s(*args))
    assert line == f"u2s run: input.uri: no folder or file at {tmp_path / 'no-such-folder'}"
    assert not (tmp_path / "safe").exists()


def test_s3_without_credentials_or_endpoint_is_one_line(tiny_models, s3_endpoint, s3_bucket, tmp_path):
    base = _run_args(str(tmp_path), f"{s3_bucket}/safe", tmp_path, tiny_models)
    no_credentials = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    no_credentials.update(
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
        AWS_DEFAULT_REGION="us-east-1",
    )
    line = _one_line(_u2s(*base, "--set", f"storage.endpoint_url={s3_endpoint}", env=no_credentials))
    assert line.startswith(f"u2s run: no AWS credentials found for {s3_bucket}/safe: set AWS_ACCESS_KEY_ID")

    dead = f"http://127.0.0.1:{_closed_port()}"
    line = _one_line(_u2s(*base, "--set", f"storage.endpoint_url={dead}"))
    assert line.startswith(f"u2s run: cannot reach {dead} for {s3_bucket}/safe within 3 s")


def test_submit_to_an_address_nobody_answers_is_one_line():
    dead = f"http://127.0.0.1:{_closed_port()}"
    line = _one_line(_u2s("submit", "--preset", "cpu-tiny", "--address", dead))
    assert line.startswith(f"submit: cannot reach a Ray dashboard at {dead}: start the cluster")

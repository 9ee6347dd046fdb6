"""`u2s submit` before the cluster: local validation, what travels with the job, the job entrypoint; and
`--wait` riding out a dropped log stream, against a real `ray start --head` behind a TCP proxy that drops
its connections and refuses new ones for a while (a dropped `kubectl port-forward`).

Submitting to real clusters (`ray start --head`, Ray's autoscaler): tests/cluster/.
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from u2s.cli import app, check_job_args
from u2s.config import load_config
from u2s.submit import (
    CONFIG_ENV,
    CONFIG_NAME,
    JOB_SCRIPT,
    UNREACHABLE_EXIT,
    SubmitError,
    build_submission,
    follow,
)
from u2s.testing.ray_cluster import RayHead
from u2s.testing.tcp_proxy import TcpProxy

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cfg(tmp_path):
    return load_config(
        preset="cpu-tiny",
        overrides=[
            f"input.uri={tmp_path / 'in'}",
            "stage2.instruct_pix2pix.num_inference_steps=3",
            "ray.address=10.0.0.1:6379",
        ],
    )


def test_a_bad_config_exits_2_before_reaching_any_cluster():
    # Nothing listens on port 9: reaching for the cluster would fail differently (and later).
    result = CliRunner().invoke(
        app,
        ["submit", "--address", "http://127.0.0.1:9", "--preset", "cpu-tiny", "--set", "stage2.seed=many",
         "--set", "stage1.calls.inspect.resources.pool_size=0"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "stage2.seed" in result.output and "stage1.calls.inspect.resources.pool_size" in result.output


def test_working_dir_submission_ships_the_checkout_and_the_resolved_config(cfg):
    submission = build_submission(cfg, working_dir=REPO)
    try:
        job_dir = Path(submission.runtime_env["working_dir"])
        assert submission.entrypoint == f"python {JOB_SCRIPT} --config {CONFIG_NAME}"
        assert (job_dir / JOB_SCRIPT).is_file() and (job_dir / "u2s" / "pipeline.py").is_file()
        assert not (job_dir / ".git").exists() and not (job_dir / ".venv").exists()
        shipped = load_config(path=job_dir / CONFIG_NAME)  # the job reloads it as is: no preset needed
        assert shipped.model_dump(exclude={"ray": {"address"}}) == cfg.model_dump(
            exclude={"ray": {"address"}}
        )
        assert shipped.ray.address is None  # inside the job, its own cluster
        assert shipped.stage2.instruct_pix2pix.num_inference_steps == 3
    finally:
        submission.cleanup()
    assert not job_dir.exists()


def test_working_dir_must_be_a_u2s_checkout(cfg, tmp_path):
    with pytest.raises(SubmitError, match=JOB_SCRIPT):
        build_submission(cfg, working_dir=tmp_path)


def test_job_options_must_be_u2s_run_options(cfg):
    with pytest.raises(SubmitError, match="--no-such-option"):
        check_job_args(["--no-such-option"])
    check_job_args(["--ray-address", "auto"])
    submission = build_submission(cfg, working_dir=REPO, job_args=["--ray-address", "auto"])
    submission.cleanup()
    assert submission.entrypoint.endswith(f"--config {CONFIG_NAME} --ray-address auto")


def test_image_submission_is_a_valid_ray_runtime_env_whose_entrypoint_reads_the_config(cfg, tmp_path):
    from ray.runtime_env import RuntimeEnv

    submission = build_submission(cfg, image="registry.example/u2s:0.1.0")
    RuntimeEnv(**submission.runtime_env)  # Ray's own check: image_uri combines only with env_vars/config
    assert submission.runtime_env["image_uri"] == "registry.example/u2s:0.1.0"
    assert "working_dir" not in submission.runtime_env and submission.staged is None
    shipped = yaml.safe_load(submission.runtime_env["env_vars"][CONFIG_ENV])
    # Run the entrypoint against this checkout's job script, with one invalid value in the config: the
    # script must read the config from the environment and reject that field (exit 2, before Ray).
    shipped["stage2"]["seed"] = "not-a-seed"
    env = {**os.environ, CONFIG_ENV: yaml.safe_dump(shipped)}
    command = submission.entrypoint.replace("python /home/ray/u2s/", f"{sys.executable} {REPO}/")
    result = subprocess.run(["sh", "-c", command], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "stage2.seed" in result.stderr


def _job_main():
    spec = importlib.util.spec_from_file_location("anonymize_job", REPO / JOB_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_job_entrypoint_takes_exactly_the_run_options(capsys):
    import typer.main

    main = _job_main()
    assert main(["--help"]) == 0
    help_text = capsys.readouterr().out
    run = typer.main.get_command(app).commands["run"]
    for param in run.params:
        for flag in param.opts:
            if flag.startswith("--"):
                assert flag in help_text
    assert main(["--no-such-option"]) == 2
    assert main(["--preset", "cpu-tiny", "--set", "stage2.seed=x"]) == 2


# --- `--wait` and a dropped log stream: a real head, its dashboard behind a proxy -----------------------


@pytest.fixture(scope="module")
def ray_head():
    """A `ray start --head` of its own (own ports and temp dir: the session's in-process Ray ignores it)."""
    with RayHead(num_cpus=1) as head:
        yield head


@pytest.fixture
def proxy(ray_head):
    """The head's dashboard (Job Submission API) behind a proxy that can be cut off: a port-forward."""
    proxy = TcpProxy(ray_head.dashboard_port)
    proxy.start()
    yield proxy
    proxy.stop()


def _numbered_lines_job(count: int, pause_s: float, exit_code: int = 0) -> str:
    """A `python -c` entrypoint printing ``line 1`` .. ``line {count}``, ``pause_s`` apart."""
    code = (
        f"import sys, time\nfor i in range(1, {count + 1}):\n"
        f"    print(f'line {{i}}', flush=True)\n    time.sleep({pause_s})\nsys.exit({exit_code})"
    )
    return f"python -c {shlex.quote(code)}"


class _Following:
    """`follow()` in a thread, writing to buffers this test reads while it runs."""

    def __init__(self, client, job_id: str, **kwargs) -> None:
        self.out, self.err = io.StringIO(), io.StringIO()
        self.result: dict = {}
        self.thread = threading.Thread(target=self._run, args=(client, job_id), kwargs=kwargs, daemon=True)
        self.thread.start()

    def _run(self, client, job_id: str, **kwargs) -> None:
        try:
            self.result["status"] = follow(client, job_id, out=self.out, err=self.err, **kwargs)
        except BaseException as e:
            self.result["error"] = e

    def wait_for(self, predicate: Callable[[str], bool]) -> None:
        """Until ``predicate(output so far)``; fails if follow() returns first."""
        while not predicate(self.out.getvalue()):
            assert self.thread.is_alive(), (self.result, self.out.getvalue(), self.err.getvalue())
            time.sleep(0.05)

    def join(self) -> str:
        self.thread.join()
        assert "error" not in self.result, (self.result, self.err.getvalue())
        return self.result["status"]


def _numbered(output: str) -> list[int]:
    return [int(n) for n in re.findall(r"^line (\d+)$", output, flags=re.MULTILINE)]


@pytest.mark.slow
def test_wait_rides_out_a_dropped_log_stream_and_prints_every_line_once(proxy):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(proxy.url)
    job_id = client.submit_job(entrypoint=_numbered_lines_job(24, 1.0), entrypoint_num_cpus=0)
    following = _Following(client, job_id, reconnect_timeout=120)
    following.wait_for(lambda out: "line 6\n" in out)
    proxy.stop()  # the port-forward drops: open connections closed, new ones refused...
    time.sleep(4)  # ...while the job prints on
    proxy.start()
    following.wait_for(lambda out: "line 14\n" in out)
    assert proxy.drop(reset=True) > 0  # then a reset of the open stream, reconnecting at once
    assert following.join() == "SUCCEEDED"
    # Each new stream replays the log from its start: nothing twice, nothing missed, in order.
    assert _numbered(following.out.getvalue()) == list(range(1, 25))
    notices = following.err.getvalue().splitlines()
    assert len(notices) >= 2 and all(n.startswith("log stream lost (") for n in notices), notices
    assert "reconnecting" in notices[0] and "Traceback" not in following.err.getvalue()


@pytest.mark.slow
def test_wait_replaces_a_log_stream_that_died_silently(proxy):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(proxy.url)
    job_id = client.submit_job(entrypoint=_numbered_lines_job(16, 0.5), entrypoint_num_cpus=0)
    following = _Following(client, job_id, reconnect_timeout=120, idle_check_s=2, call_timeout_s=5)
    following.wait_for(lambda out: "line 3\n" in out)
    # The open connections (the log stream, a status call if one is under way) stay open but carry
    # nothing more: no FIN, no RST. The stream is found silent while the log grows, a call unanswered.
    assert proxy.freeze() > 0
    assert following.join() == "SUCCEEDED", following.err.getvalue()
    assert _numbered(following.out.getvalue()) == list(range(1, 17))
    err = following.err.getvalue()
    assert "log stream stalled" in err or "no answer from the dashboard" in err, err


@pytest.mark.slow
def test_wait_returns_a_failed_job_s_status_and_the_cli_exits_1(proxy, ray_head, tmp_path):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(proxy.url)
    job_id = client.submit_job(entrypoint=_numbered_lines_job(6, 0.5, exit_code=1), entrypoint_num_cpus=0)
    following = _Following(client, job_id, reconnect_timeout=120)
    following.wait_for(lambda out: "line 3\n" in out)
    proxy.drop()
    assert following.join() == "FAILED"
    assert _numbered(following.out.getvalue()) == list(range(1, 7))
    # The CLI: a job that fails on the cluster (its input is missing there) exits 1, with the job's error.
    result = subprocess.run(
        [sys.executable, "-m", "u2s.cli", "submit", "--address", proxy.url, "--working-dir", str(REPO),
         "--wait", "--preset", "cpu-tiny", "--input", str(tmp_path / "missing"),
         "--output", str(tmp_path / "safe"), "--sensitive-output", str(tmp_path / "sensitive")],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "input.uri: no folder or file at" in result.stdout and ": FAILED" in result.stdout


@pytest.mark.slow
def test_wait_gives_up_on_a_cluster_out_of_reach_with_a_clear_message_and_exit_3(proxy, ray_head, tmp_path):
    from ray.job_submission import JobSubmissionClient

    cmd = [sys.executable, "-m", "u2s.cli", "submit", "--address", proxy.url, "--working-dir", str(REPO),
           "--wait", "--reconnect-timeout", "3", "--preset", "cpu-tiny", "--input", str(tmp_path / "in"),
           "--output", str(tmp_path / "safe"), "--sensitive-output", str(tmp_path / "sensitive")]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cli = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        first = cli.stdout.readline()  # "submitted <id> to <address>": now it follows the logs
        assert first.startswith("submitted "), (first, cli.stderr.read() if cli.poll() is not None else "")
        job_id = first.split()[1]
        proxy.stop()  # and the cluster stays out of reach
        stdout, stderr = cli.communicate(timeout=600)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == UNREACHABLE_EXIT == 3, (stdout, stderr)
    assert "Traceback" not in stderr
    final = stderr.strip().splitlines()[-1]
    assert final.startswith(f"submit: lost the log stream of job {job_id}")
    assert f"ray job status --address {proxy.url} {job_id}" in final
    assert f"ray job logs --address {proxy.url} {job_id}" in final
    # Before it: Ray's upload lines, then one notice per try to reconnect, nothing else.
    lines = stderr.strip().splitlines()
    first_notice = next(i for i, line in enumerate(lines) if line.startswith("log stream lost ("))
    assert all(line.startswith("log stream lost (") for line in lines[first_notice:-1]), stderr
    # The job itself was never touched: the cluster still knows it.
    assert JobSubmissionClient(ray_head.dashboard_url).get_job_status(job_id) is not None

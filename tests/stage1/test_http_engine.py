"""HttpEngine against real HTTP peers.

Two kinds of server, kept apart:
- model tests: a real vLLM OpenAI-compatible server (`vllm.entrypoints.openai.api_server`) serving the
  tiny Qwen2 LLM, started once per session;
- transport tests (limits, retries, timeouts, auth, request shape): a small scripted HTTP server in this
  file that answers chat completions with canned bodies and chosen status codes and delays. It stands
  in for no model: it is the peer for the transport logic, which a model server cannot drive on demand.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jsonschema
import numpy as np
import pytest
from PIL import Image

from u2s.config import GenerationConfig, HttpEngineConfig, ModelConfig, Resources, Stage1Config
from u2s.schema import mark_error, new_row
from u2s.stage1.engines import build_engine, generate_validated
from u2s.stage1.engines.base import EngineError
from u2s.stage1.engines.http import HttpEngine
from u2s.stage1.instruct import InstructStage
from u2s.stage1.prompts import inspect_messages, instruct_messages
from u2s.stage1.schemas import InstructResult, OutputError, json_schema
from u2s.testing.openai_server import free_port
from u2s.testing.rows import run_stage

SCHEMA = json_schema(InstructResult)
VALID = '{"edit_instruction":"replace the face with a generic adult face"}'


def _config(base_url: str, **overrides) -> HttpEngineConfig:
    settings = {"base_url": base_url, "api_key_env": None, "backoff_s": 0.01, "timeout_s": 10.0}
    return HttpEngineConfig(**(settings | overrides))


def _engine(
    base_url: str,
    vision: bool = False,
    image_size: int = 448,
    system_prompt: str = "system_role",
    **overrides,
) -> HttpEngine:
    config = _config(base_url, **overrides)
    return HttpEngine(config, "tiny", vision=vision, image_size=image_size, system_prompt=system_prompt)


def _conversation(key: str) -> list[dict]:
    """A text conversation whose last user message is ``key`` (the scripted server's row key)."""
    return [{"role": "system", "content": "You write JSON."}, {"role": "user", "content": key}]


# ---------------------------------------------------------------------------------------------------
# Scripted chat-completions server (transport tests)


@dataclass
class Reply:
    status: int = 200
    delay: float = 0.0
    content: str = VALID
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None  # sent as the body instead of a chat completion


@dataclass
class Call:
    at: float
    headers: dict[str, str]
    body: dict


class Scripted:
    """State of the scripted server: ``plan(key, attempt) -> Reply``, calls per row key, in-flight peak."""

    def __init__(self) -> None:
        self.plan: Callable[[str, int], Reply] = lambda key, attempt: Reply()
        self.calls: dict[str, list[Call]] = defaultdict(list)
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.url = ""


def _key(body: dict) -> str:
    content = body["messages"][-1]["content"]
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
    return content


class _Handler(BaseHTTPRequestHandler):
    server: ThreadingHTTPServer

    def do_POST(self) -> None:
        state: Scripted = self.server.state  # type: ignore[attr-defined]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        key = _key(body)
        with state.lock:
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
            attempt = len(state.calls[key])
            state.calls[key].append(Call(time.monotonic(), dict(self.headers), body))
        try:
            reply = state.plan(key, attempt)
            time.sleep(reply.delay)
            if reply.raw is not None:
                data = reply.raw
            elif reply.status == 200:
                message = {"role": "assistant", "content": reply.content}
                choice = {"index": 0, "message": message, "finish_reason": "stop"}
                data = json.dumps({"id": "x", "object": "chat.completion", "choices": [choice]}).encode()
            else:
                data = json.dumps({"error": {"message": "scripted", "code": reply.status}}).encode()
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout tests)
        finally:
            with state.lock:
                state.in_flight -= 1

    def log_message(self, format: str, *args) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    state = Scripted()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.state = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield state
    server.shutdown()
    server.server_close()


def _plans(**by_key: list[Reply]) -> Callable[[str, int], Reply]:
    """Per-key reply sequences; the last reply repeats; unknown keys get a valid completion."""
    return lambda key, attempt: by_key[key][min(attempt, len(by_key[key]) - 1)] if key in by_key else Reply()


# ---------------------------------------------------------------------------------------------------
# Transport tests


def test_request_is_portable_openai_json_without_auth_by_default(scripted, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    engine = HttpEngine(HttpEngineConfig(base_url=scripted.url + "/"), "served-llm", vision=False)
    parts = [{"role": "user", "content": [{"type": "text", "text": "row-"}, {"type": "text", "text": "1"}]}]
    assert engine.generate([parts], None, SCHEMA, max_new_tokens=99, temperature=0.0, seeds=[7]) == [VALID]
    engine.generate([_conversation("row-2")], None, SCHEMA, max_new_tokens=5, temperature=0.7)
    engine.close()

    (first,) = scripted.calls["row-1"]
    assert "authorization" not in {k.lower() for k in first.headers}
    assert first.body == {
        "model": "served-llm",
        "messages": [{"role": "user", "content": "row-1"}],  # text parts joined, as the local engine does
        "max_tokens": 99,
        "temperature": 0.0,
        "top_p": 1.0,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "u2s_result", "schema": SCHEMA, "strict": True},
        },
        "seed": 7,
    }
    (second,) = scripted.calls["row-2"]
    assert second.body["temperature"] == 0.7 and "seed" not in second.body


def test_vision_rows_carry_their_own_image_fitted_as_jpeg(scripted):
    engine = _engine(scripted.url, vision=True, image_size=56)
    wide, small = Image.new("RGB", (200, 100), (255, 0, 0)), Image.new("L", (20, 10), 128)
    conversations = [inspect_messages() for _ in range(2)]
    conversations[1][1]["content"][1]["text"] = "second"
    assert engine.generate(conversations, [wide, small], SCHEMA, 64) == [VALID, VALID]
    with pytest.raises(ValueError, match="one image per conversation"):
        engine.generate(conversations, [wide], SCHEMA, 64)
    engine.close()

    sizes = []
    for key in (_key({"messages": conversations[0]}), "second"):
        (call,) = scripted.calls[key]
        system, user = call.body["messages"]
        assert system == conversations[0][0]  # string content passes as it is
        image_part, text_part = user["content"]
        assert text_part["type"] == "text"
        assert image_part["type"] == "image_url"
        prefix, data = image_part["image_url"]["url"].split(",", 1)
        assert prefix == "data:image/jpeg;base64"
        img = Image.open(io.BytesIO(base64.b64decode(data)))
        assert img.format == "JPEG" and img.mode == "RGB"
        sizes.append(img.size)
    assert sizes == [(56, 28), (20, 10)]  # fitted, aspect kept, never upscaled
    assert conversations[0][1]["content"][0] == {"type": "image"}  # caller's messages untouched


def test_api_key_is_sent_as_bearer_and_never_logged(scripted, monkeypatch, caplog):
    secret = "sk-u2s-test-0123456789"
    monkeypatch.setenv("U2S_TEST_API_KEY", secret)
    scripted.plan = _plans(bad=[Reply(status=401)], flaky=[Reply(status=503), Reply()])
    caplog.set_level(logging.DEBUG)
    engine = _engine(scripted.url, api_key_env="U2S_TEST_API_KEY")
    out = engine.generate([_conversation("bad"), _conversation("flaky")], None, SCHEMA, 64)
    assert isinstance(out[0], EngineError) and str(out[0]) == "HTTP 401"
    assert out[1] == VALID
    for calls in scripted.calls.values():
        assert all(call.headers["Authorization"] == f"Bearer {secret}" for call in calls)
    assert secret not in caplog.text and secret not in repr(engine) and secret not in str(out[0])
    assert "flaky" not in caplog.text and "row" not in caplog.text  # no prompt text either
    engine.close()


def test_concurrency_limit_is_honoured(scripted):
    scripted.plan = lambda key, attempt: Reply(delay=0.2)
    engine = _engine(scripted.url, max_concurrency=3)
    start = time.monotonic()
    out = engine.generate([_conversation(f"row-{i}") for i in range(10)], None, SCHEMA, 64)
    elapsed = time.monotonic() - start
    engine.close()
    assert out == [VALID] * 10
    assert scripted.max_in_flight == 3
    assert elapsed >= 4 * 0.2 * 0.95  # 10 rows, 3 at a time: 4 waves


def test_qps_limit_spaces_requests(scripted):
    engine = _engine(scripted.url, qps=20.0)
    out = engine.generate([_conversation(f"row-{i}") for i in range(6)], None, SCHEMA, 64)
    engine.close()
    assert out == [VALID] * 6
    starts = sorted(calls[0].at for calls in scripted.calls.values())
    assert starts[-1] - starts[0] >= 5 / 20 * 0.9


def test_429_and_503_are_retried_with_exponential_backoff(scripted):
    scripted.plan = _plans(
        throttled=[Reply(status=429), Reply(status=429), Reply()], busy=[Reply(status=503), Reply()]
    )
    engine = _engine(scripted.url, backoff_s=0.1, max_retries=3)
    keys = ["throttled", "busy", "fine"]
    assert engine.generate([_conversation(k) for k in keys], None, SCHEMA, 64) == [VALID] * 3
    engine.close()
    assert [len(scripted.calls[k]) for k in keys] == [3, 2, 1]
    at = [call.at for call in scripted.calls["throttled"]]
    first_gap, second_gap = at[1] - at[0], at[2] - at[1]
    assert first_gap >= 0.05  # backoff_s × [0.5, 1]
    assert second_gap >= 0.1  # doubled
    assert scripted.calls["busy"][1].at - scripted.calls["busy"][0].at >= 0.05


def test_retry_after_header_is_honoured(scripted):
    scripted.plan = _plans(slow_down=[Reply(status=429, headers={"Retry-After": "0.4"}), Reply()])
    engine = _engine(scripted.url, backoff_s=0.01)
    assert engine.generate([_conversation("slow_down")], None, SCHEMA, 64) == [VALID]
    engine.close()
    first, second = scripted.calls["slow_down"]
    assert second.at - first.at >= 0.4


def test_400_fails_only_its_row_without_retry(scripted):
    scripted.plan = _plans(bad=[Reply(status=400)])
    engine = _engine(scripted.url, max_retries=3)
    out = engine.generate([_conversation("bad"), _conversation("good")], None, SCHEMA, 64)
    engine.close()
    assert isinstance(out[0], EngineError) and str(out[0]) == "HTTP 400"
    assert out[1] == VALID
    assert len(scripted.calls["bad"]) == 1


def test_exhausted_retries_and_malformed_bodies_become_row_errors(scripted):
    scripted.plan = _plans(down=[Reply(status=503)], garbage=[Reply(raw=b"<html>oops</html>")])
    engine = _engine(scripted.url, max_retries=2)
    out = engine.generate([_conversation("down"), _conversation("garbage")], None, SCHEMA, 64)
    engine.close()
    assert isinstance(out[0], EngineError) and str(out[0]) == "HTTP 503 after 3 attempts"
    assert len(scripted.calls["down"]) == 3
    assert isinstance(out[1], EngineError) and str(out[1]) == "malformed response"


def test_timeout_becomes_a_row_error(scripted):
    scripted.plan = _plans(slow=[Reply(delay=1.5)])
    engine = _engine(scripted.url, timeout_s=0.2, max_retries=1)
    out = engine.generate([_conversation("slow"), _conversation("quick")], None, SCHEMA, 64)
    engine.close()
    # Abandoned at its timeout (the server would have answered after 1.5 s), retried once, then reported.
    assert isinstance(out[0], EngineError) and str(out[0]) == "timeout after 2 attempts"
    assert out[1] == VALID
    assert len(scripted.calls["slow"]) == 2


def test_connection_errors_are_retried_then_reported():
    engine = _engine(f"http://127.0.0.1:{free_port()}/v1", max_retries=2)
    (out,) = engine.generate([_conversation("anyone?")], None, SCHEMA, 64)
    engine.close()
    assert isinstance(out, EngineError) and str(out) == "ConnectError after 3 attempts"


def test_generate_validated_keeps_transport_errors_and_retries_invalid_output(scripted):
    scripted.plan = _plans(bad=[Reply(status=400)], garbled=[Reply(content='{"edit_instruction":'), Reply()])
    engine = _engine(scripted.url)
    keys = ["bad", "garbled", "fine"]
    generation = GenerationConfig(max_new_tokens=64, retry_temperature=0.7)
    conversations = [_conversation(k) for k in keys]
    out = generate_validated(engine, conversations, None, InstructResult, generation, seeds=[11, 12, 13])
    engine.close()
    assert isinstance(out[0], OutputError) and str(out[0]) == "request failed: HTTP 400"
    assert isinstance(out[1], InstructResult) and isinstance(out[2], InstructResult)
    assert [len(scripted.calls[k]) for k in keys] == [1, 2, 1]  # the failed request is not sent again
    retry = scripted.calls["garbled"][1].body
    assert retry["temperature"] == 0.7 and retry["seed"] == 12  # the garbled row's own seed


def test_a_rows_retry_seed_follows_the_row_not_its_batch(scripted):
    """Streaming changes which rows share a batch: a row's sampled retry is seeded from its own id."""
    # Every greedy answer about a "garbled" caption is cut short; each retry (odd attempt) is valid.
    cut = Reply(content='{"edit_instruction":')
    scripted.plan = lambda key, attempt: cut if "garbled" in key and attempt % 2 == 0 else Reply()
    stage1 = Stage1Config(
        engine="http", http=_config(scripted.url, llm_model="served-llm"),
        vlm=ModelConfig(model="unused-vlm"), llm=ModelConfig(model="unused-llm"),
    )  # fmt: skip
    stage = InstructStage(stage1)

    def flagged(name: str, caption: str) -> dict:
        row = new_row(name, f"mem://{name}.png", None, b"")
        row.update(privacy_flag=True, categories=["people"], public_caption=caption)
        return row

    def retry_seeds(rows: list[dict]) -> dict[str, int]:
        out = run_stage(stage, rows)
        assert all(row["status"] is None and row["edit_instruction"] for row in out)
        return {
            row["id"]: scripted.calls[k][-1].body["seed"]
            for row in out
            for k in scripted.calls
            if row["public_caption"] in k and len(scripted.calls[k]) % 2 == 0
        }

    first = retry_seeds(
        [flagged("a", "A garbled kite."), flagged("b", "A garbled tent."), flagged("c", "A cat.")]
    )
    second = retry_seeds(
        [flagged("d", "A dog."), flagged("b", "A garbled tent."), flagged("a", "A garbled kite.")]
    )
    stage.engine.close()
    assert set(first) == set(second) == {"a", "b"}  # only the cut rows retried
    assert first == second and first["a"] != first["b"]


def test_system_messages_are_merged_when_the_server_rejects_them(scripted):
    merged_key = "You write JSON.\n\nrow-0"
    scripted.plan = lambda key, attempt: Reply(status=400) if key.startswith("row-") else Reply()
    engine = _engine(scripted.url, system_prompt="auto")
    first = engine.generate([_conversation("row-0")], None, SCHEMA, 64)
    second = engine.generate([_conversation("row-0")], None, SCHEMA, 64)
    engine.close()
    assert first == second == [VALID]
    assert len(scripted.calls["row-0"]) == 1  # once rejected, later calls merge up front
    assert [c.body["messages"] for c in scripted.calls[merged_key]] == [
        [{"role": "user", "content": merged_key}]
    ] * 2

    strict = _engine(scripted.url, system_prompt="system_role")
    (out,) = strict.generate([_conversation("row-1")], None, SCHEMA, 64)
    strict.close()
    assert isinstance(out, EngineError) and str(out) == "HTTP 400"
    always = _engine(scripted.url, system_prompt="merge_into_user")
    assert always.generate([_conversation("row-2")], None, SCHEMA, 64) == [VALID]
    always.close()
    assert "row-2" not in scripted.calls and len(scripted.calls["You write JSON.\n\nrow-2"]) == 1


def test_generate_is_reusable_from_threads_and_running_loops(scripted):
    engine = _engine(scripted.url, max_concurrency=2)
    conversations = [_conversation(f"row-{i}") for i in range(4)]
    assert engine.generate(conversations, None, SCHEMA, 64) == [VALID] * 4
    assert engine.generate([], None, SCHEMA, 64) == []

    async def inside_a_loop() -> list:
        return engine.generate(conversations, None, SCHEMA, 64)

    assert asyncio.run(inside_a_loop()) == [VALID] * 4
    results: list = []
    threads = [
        threading.Thread(target=lambda: results.append(engine.generate(conversations, None, SCHEMA, 64)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [[VALID] * 4] * 3
    assert scripted.max_in_flight <= 2  # one limit per engine, shared by concurrent callers
    engine.close()
    engine.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate(conversations, None, SCHEMA, 64)


def test_build_engine_names_the_served_model(scripted):
    stage1 = Stage1Config(
        engine="http",
        http=_config(scripted.url, llm_model="served-llm"),
        vlm=ModelConfig(model="org/some-vlm"),
        llm=ModelConfig(model="org/some-llm"),
        image_size=64,
        system_prompt="merge_into_user",
    )
    llm = build_engine(stage1, "http", stage1.llm, vision=False)
    vlm = build_engine(stage1, "http", stage1.vlm, vision=True)
    assert isinstance(llm, HttpEngine) and (llm.model_name, llm.vision) == ("served-llm", False)
    assert llm.system_prompt == vlm.system_prompt == "merge_into_user"
    assert isinstance(vlm, HttpEngine) and (vlm.model_name, vlm.vision, vlm.image_size) == (
        "org/some-vlm", True, 64)  # fmt: skip
    llm.close()
    vlm.close()


# ---------------------------------------------------------------------------------------------------
# Model tests: a real vLLM OpenAI-compatible server with the tiny LLM


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory) -> Iterator[str]:
    """`python -m vllm.entrypoints.openai.api_server` on the tiny Qwen2, once per session; its /v1 URL."""
    from u2s.testing.openai_server import running_server, server_command
    from u2s.testing.tiny_models import build_tiny_llm

    root = tmp_path_factory.mktemp("vllm-server")
    model = build_tiny_llm(root / "llm")
    port = free_port()
    command = server_command(
        str(model), "tiny", port, "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager",
        "--kv-cache-memory-bytes", str(256 * 2**20),
        "--structured-outputs-config", '{"backend":"xgrammar","disable_any_whitespace":true}',
    )  # fmt: skip
    with running_server(command, port, root / "server.log") as url:
        yield url


CAPTIONS = [
    "A person sits at the left edge of a bench, small in the frame.",
    "Two people walk a dog along a street, seen from behind.",
    "A child holds a birthday cake in a kitchen.",
    "A man in a uniform stands next to a parked car.",
]


@pytest.mark.slow
def test_vllm_server_returns_schema_valid_json(vllm_server):
    engine = _engine(vllm_server, max_concurrency=4, timeout_s=120)
    conversations = [instruct_messages(caption) for caption in CAPTIONS]
    first = engine.generate(conversations, None, SCHEMA, max_new_tokens=1024)
    second = engine.generate(conversations, None, SCHEMA, max_new_tokens=1024)
    engine.close()
    assert all(isinstance(text, str) for text in first)
    for text in first:
        jsonschema.validate(json.loads(text, strict=False), SCHEMA)
    assert first == second  # greedy


def _png(width: int, height: int, seed: int) -> bytes:
    pixels = (np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_instruct_stage_over_http_fills_flagged_rows(vllm_server):
    stage1 = Stage1Config(
        engine="http",
        http=_config(vllm_server, llm_model="tiny", timeout_s=120, max_concurrency=4),
        vlm=ModelConfig(model="unused-vlm"),
        llm=ModelConfig(model="unused-llm"),
        calls={"instruct": {"generation": GenerationConfig(max_new_tokens=1024),
                            "resources": Resources(batch_size=8, torch_threads=1)}},
    )  # fmt: skip
    rows = [new_row(f"img-{i}", f"mem://img-{i}.png", None, _png(32, 24, i)) for i in range(6)]
    for row, caption in zip(rows, [*CAPTIONS[:3], "x " * 1500, "A tree.", "A person."], strict=True):
        row.update(privacy_flag=True, categories=["people"], public_caption=caption)
    rows[4].update(status="kept", privacy_flag=False, categories=[])
    mark_error(rows[5], "describe", "earlier failure")
    before = copy.deepcopy(rows)

    stage = InstructStage(stage1)
    out = run_stage(stage, rows)
    stage.engine.close()
    for row in out[:3]:
        assert row["status"] is None and row["error"] is None
        InstructResult(edit_instruction=row["edit_instruction"])
        assert row["timings"]["instruct"] > 0
    # A prompt longer than the server's context: vLLM answers 400, only that row fails.
    assert out[3]["status"] == "error" and out[3]["error"] == "instruct: request failed: HTTP 400"
    assert out[3]["edit_instruction"] is None
    assert out[4:] == before[4:]

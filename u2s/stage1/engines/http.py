"""Engine for any OpenAI-compatible chat-completions server (`vllm serve`, SGLang, hosted APIs).

Requests go out concurrently (at most ``max_concurrency`` in flight, optionally ``qps``-limited), each
retried with exponential backoff and jitter on 429, 408, 5xx, timeouts and connection errors. A row
whose request ultimately fails comes back as :class:`~u2s.stage1.engines.base.EngineError`, with a
content-free message (status code or exception type): prompts, outputs and the API key are never
logged or put in an error.

Transport is plain ``httpx.AsyncClient``, not the ``openai`` SDK: the SDK refuses to start without an
API key (a local `vllm serve` has none), retries on its own schedule and hides status codes in its
exception types, while u2s needs one retry/backoff policy and one rate limit shared by every row; a JSON
body is also exactly what each compatible server documents, vendor extensions included.

The stages call :meth:`HttpEngine.generate` synchronously (in Ray actors, plain threads, notebooks). The
engine owns a private event loop on a daemon thread (:class:`~u2s.stage1.engines.loop.LoopThread`) and
blocks on the coroutine it submits there, so ``generate`` works from any thread, whether or not that
thread already runs a loop, and keeps its connection pool between calls.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
import weakref
from typing import TYPE_CHECKING, Any

from u2s.stage1.engines.base import Decoding, Engine, EngineError
from u2s.stage1.engines.loop import LoopThread
from u2s.stage1.engines.messages import (
    SystemPrompt,
    has_system,
    image_data_url,
    merge_system_into_user,
    text_only,
    with_image_url,
)

if TYPE_CHECKING:
    import httpx
    from PIL import Image

    from u2s.config import HttpEngineConfig

logger = logging.getLogger(__name__)

#: Status codes worth another try: timeout, rate limit, server errors (5xx are added in `_retryable`).
RETRYABLE_STATUS = frozenset({408, 429})
#: Longest server-requested wait (``Retry-After``) honoured before a retry.
MAX_RETRY_AFTER_S = 60.0
#: Name of the response format sent with each request (OpenAI requires ``^[a-zA-Z0-9_-]{1,64}$``).
SCHEMA_NAME = "u2s_result"
JPEG_QUALITY = 90


def _retryable(status: int) -> bool:
    return status in RETRYABLE_STATUS or status >= 500


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds from a numeric ``Retry-After`` header (HTTP dates are ignored), capped."""
    try:
        return min(max(float(response.headers.get("retry-after", "")), 0.0), MAX_RETRY_AFTER_S)
    except ValueError:
        return None


class _TokenBucket:
    """At most ``rate`` acquisitions per second, burst of one (requests are evenly spaced)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = 1.0
        self.last = time.monotonic()
        self.lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self.lock:
            while True:
                now = time.monotonic()
                self.tokens = min(1.0, self.tokens + (now - self.last) * self.rate)
                self.last = now
                if self.tokens >= 1.0:
                    self.tokens -= 1.0
                    return
                await asyncio.sleep((1.0 - self.tokens) / self.rate)


def _content(response: httpx.Response) -> str | EngineError:
    """The first choice's message text of a 2xx chat-completions response."""
    try:
        message = response.json()["choices"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        return EngineError("malformed response")
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return content
    return EngineError("refused" if isinstance(message, dict) and message.get("refusal") else "no content")


def _shutdown(loop: LoopThread, client: httpx.AsyncClient) -> None:
    """Close the client, stop the loop and its thread (the engine's finalizer: no reference to it)."""
    loop.stop(client.aclose())


class HttpEngine(Engine):
    """Chat completions with ``response_format: json_schema`` (strict) on an OpenAI-compatible server.

    ``system_prompt`` as in :class:`~u2s.stage1.engines.base.Engine`; "auto" merges once the server has
    answered 400 to a request with a system message and accepted the merged one (a served chat template
    without a system role), and keeps merging.
    """

    def __init__(
        self,
        http: HttpEngineConfig,
        model_name: str,
        vision: bool,
        image_size: int = 448,
        system_prompt: SystemPrompt = "auto",
    ) -> None:
        import httpx

        super().__init__(vision, image_size, system_prompt)
        self.config = http
        self.model_name = model_name
        self.url = http.base_url.rstrip("/") + "/chat/completions"
        headers = {}
        key = os.environ.get(http.api_key_env) if http.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._loop = LoopThread("u2s-http-engine")

        async def setup() -> tuple[httpx.AsyncClient, asyncio.Semaphore, _TokenBucket | None]:
            limits = httpx.Limits(
                max_connections=http.max_concurrency, max_keepalive_connections=http.max_concurrency
            )
            client = httpx.AsyncClient(headers=headers, timeout=http.timeout_s, limits=limits)
            bucket = _TokenBucket(http.qps) if http.qps else None
            return client, asyncio.Semaphore(http.max_concurrency), bucket

        self._client, self._slots, self._bucket = self._loop.run(setup())
        self._finalizer = weakref.finalize(self, _shutdown, self._loop, self._client)

    def __repr__(self) -> str:
        return f"HttpEngine(url={self.url!r}, model={self.model_name!r}, vision={self.vision})"

    def close(self) -> None:
        """Close connections and stop the engine's loop thread (also done when the engine is collected)."""
        self._finalizer()

    def _generate(
        self, conversations: list[list[dict]], images: list[Image.Image] | None, decoding: Decoding
    ) -> list[str | EngineError]:
        response_format = {
            "type": "json_schema",
            "json_schema": {"name": SCHEMA_NAME, "schema": decoding.schema, "strict": True},
        }
        requests = []
        for i, conversation in enumerate(conversations):
            if self.vision:
                url = image_data_url(images[i], self.image_size, "JPEG", JPEG_QUALITY)
                messages = with_image_url(conversation, url)
            else:
                messages = text_only(conversation)
            merged = merge_system_into_user(messages) if has_system(messages) else None
            if merged is not None and self._merge_system:
                messages, merged = merged, None
            body: dict[str, Any] = {
                "model": self.model_name,
                "messages": messages,
                # max_tokens, not max_completion_tokens: every compatible server (vLLM, SGLang, TGI,
                # llama.cpp) knows it; OpenAI still accepts it for non-reasoning models.
                "max_tokens": decoding.max_new_tokens,
                "temperature": decoding.temperature,  # 0: greedy
                "top_p": 1.0,  # plain temperature sampling, as the local engine does
                "response_format": response_format,
            }
            if decoding.seeds is not None:
                body["seed"] = decoding.seeds[i]
            fallback = (
                {**body, "messages": merged} if merged is not None and self.system_prompt == "auto" else None
            )
            requests.append((body, fallback))
        return self._loop.run(self._post_all(requests))

    async def _post_all(self, requests: list[tuple[dict, dict | None]]) -> list[str | EngineError]:
        return list(await asyncio.gather(*(self._post_row(body, fallback) for body, fallback in requests)))

    async def _post_row(self, body: dict, fallback: dict | None) -> str | EngineError:
        """One row; in "auto" mode a 400 to a system message is retried once with it merged."""
        result = await self._post(body)
        if fallback is None or not isinstance(result, EngineError) or str(result) != "HTTP 400":
            return result
        result = await self._post(fallback)
        if isinstance(result, str) and not self._merge_system:
            self._merge_system = True
            logger.info("http engine: server rejects system messages; merging them into the user turn")
        return result

    async def _post(self, body: dict) -> str | EngineError:
        """One row: post, retry what is retryable, and never raise (failures become EngineError)."""
        import httpx

        attempts = self.config.max_retries + 1
        reason = "not sent"
        for attempt in range(attempts):
            wait: float | None = None
            try:
                async with self._slots:
                    if self._bucket is not None:
                        await self._bucket.acquire()
                    # httpx's timeout bounds each phase; wait_for bounds the whole request.
                    response = await asyncio.wait_for(
                        self._client.post(self.url, json=body), self.config.timeout_s
                    )
            except (asyncio.TimeoutError, httpx.TimeoutException):
                reason = "timeout"
            except httpx.TransportError as e:
                reason = type(e).__name__
            except Exception as e:  # a bug or an unexpected library error: fail the row, not the batch
                logger.warning("http engine: request raised %s", type(e).__name__)
                return EngineError(f"unexpected {type(e).__name__}")
            else:
                if response.is_success:
                    return _content(response)
                reason = f"HTTP {response.status_code}"
                if not _retryable(response.status_code):
                    logger.warning("http engine: request failed with %s (not retried)", reason)
                    return EngineError(reason)
                wait = _retry_after(response)
            if attempt + 1 < attempts:
                delay = self.config.backoff_s * 2**attempt * random.uniform(0.5, 1.0)  # equal jitter
                delay = max(delay, wait or 0.0)
                logger.info(
                    "http engine: %s, retry %d of %d in %.2fs", reason, attempt + 1, attempts - 1, delay
                )
                await asyncio.sleep(delay)
        logger.warning("http engine: request failed with %s after %d attempts", reason, attempts)
        return EngineError(f"{reason} after {attempts} attempts")

"""A private asyncio event loop on a daemon thread: how the async engines offer a synchronous ``generate``.

The stages call engines synchronously (in Ray actors, plain threads, notebooks), possibly from several
threads at once (a vLLM pool runs several batches per actor). An engine that talks to an async client
(``httpx.AsyncClient``, vLLM's ``AsyncLLM``) keeps that client on one loop running forever on its own
thread; :meth:`LoopThread.run` submits a coroutine there and blocks the calling thread until it is done,
so every caller shares one client, whether or not the calling thread runs a loop of its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Coroutine

logger = logging.getLogger(__name__)


class LoopThread:
    """An event loop running forever on a daemon thread named ``name``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        """Run ``coro`` on the loop and return its result (blocks the calling thread; thread-safe).

        ``timeout``: seconds to wait; past it the coroutine is cancelled on the loop and
        :class:`TimeoutError` raised (a hung engine fails the call instead of stalling the actor).
        """
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError(f"{self.name}: called from its own event loop")
        if self.loop.is_closed():
            coro.close()
            raise RuntimeError(f"{self.name} is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()  # cancels the task on the loop: its requests are aborted, its slots freed
            raise TimeoutError(f"{self.name}: no result after {timeout:g}s") from None

    def stop(self, cleanup: Coroutine[Any, Any, Any] | None = None, timeout: float = 5.0) -> None:
        """Run ``cleanup`` on the loop (best effort), then stop the loop and join its thread."""
        if self.loop.is_closed():
            if cleanup is not None:
                cleanup.close()
            return
        on_loop = threading.current_thread() is self.thread
        if cleanup is not None:
            if on_loop:  # a finalizer running on the loop thread itself: it cannot wait for the loop
                cleanup.close()
            else:
                try:
                    asyncio.run_coroutine_threadsafe(cleanup, self.loop).result(timeout=timeout)
                except Exception as e:  # shutting down: a failed cleanup only leaks a socket or process
                    logger.debug("%s: cleanup failed (%s)", self.name, type(e).__name__)
        self.loop.call_soon_threadsafe(self.loop.stop)
        if not on_loop:
            self.thread.join(timeout=timeout)
            if not self.thread.is_alive():
                self.loop.close()

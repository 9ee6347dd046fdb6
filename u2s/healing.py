"""Errors that heal inside the model stages: out-of-memory splits, device failures, poison rows.

Every model stage fails in one of three ways, told apart by :func:`classify`:

* ``oom``: the device ran out of memory for this call (``torch.OutOfMemoryError``, or the messages CUDA,
  cuBLAS and vLLM use for it). The process is fine; a smaller call may fit. :func:`split_on_oom` runs a
  function over a list of items, halving the list after each OOM (freeing the allocator's cache between
  tries) down to single items; an item that still does not fit alone comes back as :class:`OutOfMemory`,
  its row an error "out of memory". The editor runs each chunk this way, as do the local stage-1 engines.
* ``fatal``: the device or the engine can serve nothing more in this process (a sticky CUDA error such as
  an illegal memory access or a device-side assert, a launch failure, an NCCL error, vLLM's
  ``EngineDeadError``). The actor must exit so that Ray starts a fresh one.
* ``other``: anything else fails its own rows only (what each stage already does).

Device failures restart the actor, bounded, and isolate a poison row. The simplest design that holds
across a process death: :class:`BatchGuard` (used by :class:`~u2s.stage.Stage` for every batch)
records, on a fatal error in a Ray actor, every batch the actor had in flight in the cluster's key-value
store (keyed by job, stage and a fingerprint of the batch's row ids), then exits the process. Ray restarts
the actor (``max_restarts``) and retries the batch on it (``max_task_retries``, both from the pool's
``Resources``). A retried batch found in the store runs one row at a time, marking in the store the row
it is on before running it: when a row kills the actor again, the next retry turns that row into an error
row ("engine died on this row" or "device failed on this row"; content-free) and carries on with the
rest. So each death costs one restart and isolates at most one row, and a batch cannot loop. On the
actor's last life (its restarts used up) a fatal error fails the job instead, with a message that says
so, rather than exiting into a dead pool.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

logger = logging.getLogger(__name__)

Kind = Literal["oom", "fatal", "other"]
T = TypeVar("T")
R = TypeVar("R")

#: Error reason of a row that runs out of device memory even alone.
OOM_REASON = "out of memory"
#: Error reasons of a row that killed the engine or the device each time it ran (by what died).
POISON_REASONS = {"engine": "engine died on this row", "device": "device failed on this row"}

#: Message fragments of a device out-of-memory error (CUDA, ROCm, cuBLAS, diffusers and vLLM wrap them).
_OOM_PATTERNS = (
    "cuda out of memory",
    "hip out of memory",
    "cuda error: out of memory",
    "cublas_status_alloc_failed",
    "cudaerrormemoryallocation",
    "out of memory on device",
)
#: Message fragments of errors after which the CUDA context (or the collective) is unusable.
_FATAL_PATTERNS = (
    "cuda error",
    "illegal memory access",
    "device-side assert",
    "cudaerrorlaunchfailure",
    "cudaerrorillegaladdress",
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
    "uncorrectable ecc error",
    "cublas_status_execution_failed",
    "cublas_status_internal_error",
    "nccl error",
    "ncclunhandledcudaerror",
    "ncclsystemerror",
    "ncclinternalerror",
)
#: Exception type names that mean the engine (not the row) is dead, wherever they come from.
_ENGINE_DEAD = frozenset({"EngineDeadError"})
#: Exception type names of CUDA runtime errors raised by torch.
_DEVICE_TYPES = frozenset({"AcceleratorError", "CudaError"})


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and what caused it (``__cause__`` / ``__context__``), without cycles."""
    seen: list[BaseException] = []
    while error is not None and error not in seen and len(seen) < 16:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def _is_torch_oom(error: BaseException) -> bool:
    torch = sys.modules.get("torch")  # never import torch here: no torch, no torch OOM
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(
        getattr(torch, "cuda", None), "OutOfMemoryError", None
    )
    return oom is not None and isinstance(error, oom)


def classify(error: BaseException) -> Kind:
    """``oom``, ``fatal`` or ``other`` (see the module docstring); looks at the cause chain too.

    The message is read only to classify; it never leaves this function (it may quote private text).
    """
    chain = _chain(error)
    names = {cls.__name__ for e in chain for cls in type(e).__mro__}
    if names & _ENGINE_DEAD:
        return "fatal"
    messages = [str(e).lower() for e in chain]
    if any(_is_torch_oom(e) for e in chain) or any(p in m for m in messages for p in _OOM_PATTERNS):
        return "oom"
    if names & _DEVICE_TYPES or any(p in m for m in messages for p in _FATAL_PATTERNS):
        return "fatal"
    return "other"


def what_died(error: BaseException) -> Literal["engine", "device"]:
    """Which part a fatal ``error`` took down: the inference engine or the device."""
    names = {cls.__name__ for e in _chain(error) for cls in type(e).__mro__}
    return "engine" if names & _ENGINE_DEAD else "device"


def free_device_memory() -> None:
    """Drop unreachable tensors and return the CUDA allocator's cached blocks (when CUDA is in use)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# -- out of memory: split and retry -------------------------------------------------------------------


@dataclass(frozen=True)
class OutOfMemory:
    """The result of an item that ran out of device memory even alone."""

    reason: str = OOM_REASON


def split_on_oom(fn: Callable[[list[T]], Sequence[R]], items: list[T]) -> list[R | OutOfMemory]:
    """``fn(items)``, one result per item; after an out-of-memory error, halves run separately (down to
    single items, freeing device memory before each retry). An item that runs out of memory alone gives
    :class:`OutOfMemory`. Any other error propagates. ``fn`` must return one result per item."""
    if not items:
        return []
    oom = False
    try:
        results = list(fn(items))
    except Exception as e:
        if classify(e) != "oom":
            raise
        oom = True  # leave the except block first: its traceback holds the failed call's tensors
    if not oom:
        if len(results) != len(items):
            raise RuntimeError(f"{len(results)} results for {len(items)} items")
        return results
    free_device_memory()
    if len(items) == 1:
        logger.warning("out of device memory on a single item")
        return [OutOfMemory()]
    half = (len(items) + 1) // 2
    logger.warning(
        "out of device memory on %d items: retrying as %d + %d", len(items), half, len(items) - half
    )
    return split_on_oom(fn, items[:half]) + split_on_oom(fn, items[half:])


# -- fatal errors: restart the actor, isolate the row -------------------------------------------------

_NAMESPACE = "u2s-healing"
_in_flight: set[BatchGuard] = set()
_in_flight_lock = threading.Lock()


def _actor_id() -> str | None:
    """This Ray actor's id (hex), or None outside a Ray actor."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        actor = ray.get_runtime_context().get_actor_id()
    except Exception:  # no Ray, or no runtime context
        return None
    return actor


def _kv() -> tuple[Callable, Callable, Callable]:
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get, _internal_kv_put

    return _internal_kv_get, _internal_kv_put, _internal_kv_del


def _restarts(actor_id: str) -> tuple[int, int] | None:
    """(restarts so far, ``max_restarts``) of an actor, from Ray's actor table; None when unknown."""
    try:
        import ray
        from ray._private.state import state
        from ray.core.generated import gcs_pb2

        info = state._connect_and_get_accessor().get_actor_info(ray.ActorID.from_hex(actor_id))
        data = gcs_pb2.ActorTableData.FromString(info)
        return data.num_restarts, data.max_restarts
    except Exception as e:  # an internal API: without it, Ray's own bound still holds
        logger.debug("actor restarts unknown (%s)", type(e).__name__)
        return None


class DeviceFailure(RuntimeError):
    """A device or engine failed for good: the actor has no restart left (fails the job)."""


class BatchGuard:
    """The fatal-error bookkeeping of one batch of one stage (see the module docstring).

    Outside a Ray actor it does nothing: :attr:`suspect` is False and :meth:`died` returns.
    """

    def __init__(self, stage: str, ids: Sequence[str]) -> None:
        self.stage = stage
        self.actor = _actor_id()
        self.record: dict | None = None
        self.key = b""
        if self.actor is None:
            return
        import ray

        digest = hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()
        self.key = f"{ray.get_runtime_context().get_job_id()}/{stage}/{digest}".encode()
        get, _, _ = _kv()
        try:
            raw = get(self.key, namespace=_NAMESPACE)
        except Exception as e:  # the store unreachable: run the batch as a fresh one
            logger.debug("healing store unreachable (%s)", type(e).__name__)
            raw = None
        if raw:
            self.record = json.loads(raw)
            # The row it was on when the process died (with or without a Python error) is the poison row.
            if self.record.get("current") is not None:
                self.record.setdefault("poison", {})[self.record["current"]] = self.record.get(
                    "died", "device"
                )
                self.record["current"] = None
        with _in_flight_lock:
            _in_flight.add(self)

    @property
    def suspect(self) -> bool:
        """Whether this batch was in flight when an actor died: run it one row at a time."""
        return self.record is not None

    def poison(self, row_id: str) -> str | None:
        """The error reason of a row that killed an actor before (None: run it)."""
        died = (self.record or {}).get("poison", {}).get(str(row_id))
        return None if died is None else POISON_REASONS[died]

    def running(self, row_id: str | None) -> None:
        """Mark the row about to run alone (None: between rows), so a death on it is pinned to it."""
        if self.record is None:
            return
        self.record["current"] = None if row_id is None else str(row_id)
        self._save(self.record)

    def _save(self, record: dict) -> None:
        _, put, _ = _kv()
        put(self.key, json.dumps(record).encode(), overwrite=True, namespace=_NAMESPACE)

    def done(self) -> None:
        """The batch finished: forget it."""
        if self.actor is None:
            return
        with _in_flight_lock:
            _in_flight.discard(self)
        if self.record is not None:
            _, _, delete = _kv()
            try:
                delete(self.key, namespace=_NAMESPACE)
            except Exception as e:  # a leftover key only costs a one-row-at-a-time rerun of this batch
                logger.debug("healing store: delete failed (%s)", type(e).__name__)

    def died(self, error: BaseException) -> None:
        """A fatal ``error``: in a Ray actor, record every batch in flight here and exit the process (Ray
        restarts the actor and retries them); on the actor's last life raise :class:`DeviceFailure`.
        Outside a Ray actor, return (the caller fails the rows)."""
        if self.actor is None:
            return
        died = what_died(error)
        name = type(error).__name__
        restarts = _restarts(self.actor)
        if restarts is not None and 0 <= restarts[1] <= restarts[0]:
            with _in_flight_lock:
                _in_flight.discard(self)
            raise DeviceFailure(
                f"stage {self.stage}: {died} failed ({name}) and the actor has used its {restarts[1]} "
                "restarts (Resources.max_restarts): failing the job"
            ) from None
        logger.error("stage %s: %s failed (%s); exiting so Ray restarts this actor", self.stage, died, name)
        with _in_flight_lock:
            guards = list(_in_flight)
        for guard in guards:
            record = dict(guard.record or {"poison": {}})
            if guard is not self:  # a batch that shared the dead device: it runs again, row by row
                record["current"] = None
            record["died"] = died
            try:
                guard._save(record)
            except Exception as e:  # unrecorded, the batch is retried whole (Ray's retry bound holds)
                logger.error("healing store: could not record a batch (%s)", type(e).__name__)
        logging.shutdown()
        os._exit(1)

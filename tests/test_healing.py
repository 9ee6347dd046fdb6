"""u2s.healing: error classes, the out-of-memory split, and fatal device errors in a real Ray Data pool
(the actor exits, Ray restarts it, the retried batch isolates the row that kills it; bounded)."""

from __future__ import annotations

import os
import sys
from typing import ClassVar

import pyarrow as pa
import pytest
import torch

from u2s.config import Resources
from u2s.healing import OOM_REASON, OutOfMemory, classify, split_on_oom
from u2s.schema import new_row, rows_to_table
from u2s.stage import Stage

ILLEGAL_ACCESS = "CUDA error: an illegal memory access was encountered\nCompile with `TORCH_USE_CUDA_DSA`"


class EngineDeadError(Exception):
    """vLLM's dead-engine error is recognised by its type name, wherever it is raised from."""


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "oom"),
        (RuntimeError("CUDA out of memory. Tried to allocate 1.50 GiB (GPU 0; 79.1 GiB total)"), "oom"),
        (RuntimeError("CUDA error: out of memory"), "oom"),
        (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), "oom"),
        (RuntimeError(ILLEGAL_ACCESS), "fatal"),
        (RuntimeError("CUDA error: device-side assert triggered"), "fatal"),
        (RuntimeError("CUDA error: unspecified launch failure (cudaErrorLaunchFailure)"), "fatal"),
        (RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error"), "fatal"),
        (EngineDeadError("EngineCore encountered an issue"), "fatal"),
        (ValueError("the prompt is too long"), "other"),
        (KeyError("out of"), "other"),
    ],
)
def test_classify(error, kind):
    assert classify(error) == kind


def test_classify_follows_the_cause_chain():
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError as inner:
            raise RuntimeError("pipeline call failed") from inner
    except RuntimeError as outer:
        assert classify(outer) == "oom"


def test_split_on_oom_halves_down_to_single_items():
    calls: list[list[int]] = []

    def square(items: list[int]) -> list[int]:  # the fake device holds 2 items, and never item 7
        calls.append(items)
        if len(items) > 2 or 7 in items:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return [i * i for i in items]

    results = split_on_oom(square, [1, 2, 3, 4, 5, 7])
    assert results[:5] == [1, 4, 9, 16, 25] and results[5] == OutOfMemory()
    assert results[5].reason == OOM_REASON == "out of memory"
    assert calls[0] == [1, 2, 3, 4, 5, 7] and [7] in calls and max(len(c) for c in calls[1:]) == 3


def test_split_on_oom_lets_other_errors_through():
    def broken(items: list[int]) -> list[int]:
        raise ValueError("a bug")

    with pytest.raises(ValueError):
        split_on_oom(broken, [1, 2])
    with pytest.raises(RuntimeError, match="1 results for 2 items"):
        split_on_oom(lambda items: items[:1], [1, 2])


def test_an_engine_batch_out_of_memory_splits_and_fails_only_the_row_too_long_alone(tiny_models):
    """The tiny transformers LLM through the engine interface; a forward pre-hook plays a device that
    holds one sequence of a short prompt's length, no batch of two and no long prompt."""
    from u2s.config import ModelConfig
    from u2s.stage1.engines.base import EngineError
    from u2s.stage1.engines.transformers import TransformersEngine
    from u2s.stage1.prompts import instruct_messages
    from u2s.stage1.schemas import InstructResult, json_schema

    engine = TransformersEngine(
        ModelConfig(model=str(tiny_models["llm"]), dtype="float32", device="cpu"), False
    )
    captions = ["A cat.", "A dog.", "A person " + "in a long coat " * 60, "A tree."]
    conversations = [instruct_messages(caption) for caption in captions]
    lengths: list[int] = []
    probe = engine.model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    engine.generate(conversations[:1], None, json_schema(InstructResult), max_new_tokens=4)
    probe.remove()
    calls: list[tuple[int, int]] = []

    def small_device(module, args, kwargs):
        ids = kwargs["input_ids"]
        if ids.shape[0] > 1 or ids.shape[1] > lengths[0] + 50:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB")
        calls.append(tuple(ids.shape))

    hook = engine.model.register_forward_pre_hook(small_device, with_kwargs=True)
    try:
        texts = engine.generate(conversations, None, json_schema(InstructResult), max_new_tokens=4)
    finally:
        hook.remove()
        engine.close() if hasattr(engine, "close") else None
    assert [isinstance(t, str) for t in texts] == [True, True, False, True]
    assert isinstance(texts[2], EngineError) and str(texts[2]) == "out of memory"
    assert calls and all(batch == 1 for batch, _ in calls)


# -- a hung engine call ---------------------------------------------------------------------------------


def test_a_hung_engine_call_times_out_and_is_cancelled():
    import asyncio
    import time

    from u2s.stage1.engines.loop import LoopThread

    loop = LoopThread("test-loop")
    cancelled = []

    async def hang() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"no result after 0\.5s"):
        loop.run(hang(), timeout=0.5)
    waited = time.monotonic() - start
    for _ in range(50):
        if cancelled:
            break
        time.sleep(0.05)
    assert cancelled and waited >= 0.5
    assert loop.run(asyncio.sleep(0, result="alive"), timeout=5) == "alive"  # the loop still serves
    loop.stop()


# -- fatal device errors in a Ray Data actor pool -------------------------------------------------------


class DeviceStage(Stage):
    """Writes the actor's pid into ``public_caption``; the row ``poison`` (or, with ``always``, every row)
    breaks the device. Each actor start appends its pid to ``$U2S_TEST_STARTS``."""

    name = "device"
    writes: ClassVar[tuple[str, ...]] = ("public_caption",)

    def __init__(self, starts: str, always: bool = False) -> None:
        self.always = always
        with open(starts, "a") as f:
            f.write(f"{os.getpid()}\n")

    def process(self, rows: list[dict]) -> None:
        for row in rows:
            if self.always or row["id"] == "poison":
                raise RuntimeError(ILLEGAL_ACCESS)
        for row in rows:
            row["public_caption"] = str(os.getpid())
            row["status"] = "kept"


def _dataset(ray, ids: list[str], resources: Resources, **kwargs):
    from u2s.map_pool import actor_stage

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    table = rows_to_table([new_row(rid, f"src/{rid}", "cat", b"") for rid in ids])
    ds = ray.data.from_arrow([table.slice(i, 4) for i in range(0, len(ids), 4)])
    return actor_stage(ds, DeviceStage, resources, **kwargs)


def _pool(max_restarts: int) -> Resources:
    return Resources(pool_size=1, batch_size=4, num_cpus=0.25, max_restarts=max_restarts, max_task_retries=3)


def test_a_device_error_restarts_the_actor_and_isolates_its_row(ray_cluster, tmp_path):
    ids = ["a", "b", "poison", "c", "d", "e", "f", "g"]
    starts = tmp_path / "starts"
    out = pa.concat_tables(
        ray_cluster.get(_dataset(ray_cluster, ids, _pool(2), starts=str(starts)).to_arrow_refs())
    ).to_pylist()

    assert sorted(row["id"] for row in out) == sorted(ids)  # every row exactly once
    rows = {row["id"]: row for row in out}
    assert (
        rows["poison"]["status"] == "error" and rows["poison"]["error"] == "device: device failed on this row"
    )
    assert all(rows[rid]["status"] == "kept" for rid in ids if rid != "poison")
    pids = starts.read_text().split()
    # Two deaths: the whole batch, then the poison row alone; the third life finished the batch.
    assert len(pids) == 3 and len(set(pids)) == 3
    assert {rows[rid]["public_caption"] for rid in ("a", "b", "c")} == {pids[-1]}


def test_a_device_that_stays_broken_fails_the_job_clearly(ray_cluster, tmp_path):
    starts = tmp_path / "starts"
    ds = _dataset(ray_cluster, ["a", "b", "c"], _pool(1), starts=str(starts), always=True)
    with pytest.raises(Exception, match="the actor has used its 1 restarts"):
        ds.materialize()
    assert len(starts.read_text().split()) == 2  # one restart, then the job failed: no loop

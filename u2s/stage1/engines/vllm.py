"""vLLM engine inside the job: one `AsyncLLM` per actor, every row one request.

The stages run it like any other engine (:class:`~u2s.stage1.call.ModelCallStage` sends only the rows
a call wants; the others pass through untouched). The engine owns vLLM's async engine on a private
event loop (:class:`~u2s.stage1.engines.loop.LoopThread`), so :meth:`VLLMEngine.generate` may be called
from several threads at once: a pool (:mod:`u2s.stage1.engines.vllm_pool`) runs several batches per actor
and their requests share one continuously batched engine.

Per request: the conversation goes through the model's chat template with vLLM's renderer
(``renderer.render_chat_async`` + ``ChatParams``, vLLM 0.29's non-deprecated input path; images as PIL
parts, downscaled to ``max_image_side``), then ``AsyncLLM.generate`` decodes JSON constrained to the
call's schema (``StructuredOutputsParams``), greedily or, on the shared retry, sampled under each row's seed.
Prefix caching is on by default: every row of a call shares its system prompt.

Robustness follows ray.data.llm's engine stage: a semaphore caps requests in flight at
1.1 × ``max_num_seqs`` × pipeline stages; a dead engine (vLLM's ``EngineDeadError``, Ray's
``VLLM_FATAL_ERRORS``) raises out of :meth:`VLLMEngine.generate`, and the stage exits the actor so Ray
restarts it and retries the batch, which then runs row by row so that a row that kills the engine each
time becomes an error row "engine died on this row" (:mod:`u2s.healing`); a request that takes longer
than ``request_timeout_s`` is aborted and fails its row ("engine timed out"); any other failure fails
that row only, as a content-free :class:`~u2s.stage1.engines.base.EngineError`.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import uuid
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from u2s.log_privacy import silence_input_echo
from u2s.stage1.engines.base import Decoding, Engine, EngineError
from u2s.stage1.engines.loop import LoopThread
from u2s.stage1.engines.messages import (
    SystemPrompt,
    fit_image,
    has_system,
    merge_system_into_user,
    text_only,
    with_image_part,
    with_parts,
)

if TYPE_CHECKING:
    from PIL import Image

    from u2s.config import ModelConfig, StorageConfig, VLLMEngineConfig

logger = logging.getLogger(__name__)


# -- engine arguments ---------------------------------------------------------------------------------


def world_size(vllm: VLLMEngineConfig) -> int:
    """Workers (devices) of one engine replica: tensor × pipeline parallelism."""
    return vllm.tensor_parallel_size * vllm.pipeline_parallel_size


def executor_backend(vllm: VLLMEngineConfig) -> str:
    """vLLM's distributed executor: ``engine_kwargs`` wins; else "uni" (one worker, in the engine process)
    or "ray" (workers in the actor's placement group, as ray.data.llm runs tensor parallelism)."""
    return vllm.engine_kwargs.get("distributed_executor_backend") or (
        "uni" if world_size(vllm) == 1 else "ray"
    )


def engine_kwargs(model: ModelConfig, vllm: VLLMEngineConfig, vision: bool) -> dict[str, Any]:
    """vLLM engine arguments (`AsyncEngineArgs`) from the model and engine configs (``vllm.engine_kwargs``
    win)."""
    kwargs: dict[str, Any] = {
        "dtype": vllm.dtype or model.dtype,
        "tensor_parallel_size": vllm.tensor_parallel_size,
        "pipeline_parallel_size": vllm.pipeline_parallel_size,
        "distributed_executor_backend": executor_backend(vllm),
        "gpu_memory_utilization": vllm.gpu_memory_utilization,
        "enable_prefix_caching": vllm.enable_prefix_caching,
        "enforce_eager": vllm.enforce_eager,
        "trust_remote_code": model.trust_remote_code,
        "structured_outputs_config": dict(vllm.structured_outputs_config),
    }
    optional = {
        "load_format": vllm.load_format if vllm.load_format != "auto" else None,
        "revision": model.revision,
        "max_model_len": vllm.max_model_len,
        "max_num_seqs": vllm.max_num_seqs,
        "kv_cache_memory_bytes": vllm.kv_cache_memory_bytes,
    }
    if vision:
        optional |= {"limit_mm_per_prompt": dict(vllm.limit_mm_per_prompt),
                     "mm_processor_kwargs": vllm.mm_processor_kwargs}  # fmt: skip
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    kwargs.update(vllm.engine_kwargs)
    return kwargs


def set_engine_env(vllm: VLLMEngineConfig) -> None:
    """Put ``vllm.env_vars`` into this process's environment before vLLM starts: its engine core process
    inherits them, and under tensor parallelism vLLM's Ray executor copies its own (VLLM_*, HF_*, NCCL_*...)
    and those named in VLLM_RAY_EXTRA_ENV_VARS_TO_COPY (the others, here, unless they name a secret) to
    its workers. Not through Ray's runtime_env: its agent logs the values, secrets included."""
    from u2s.config_base import is_secret_name

    if not vllm.env_vars:
        return
    os.environ.update(vllm.env_vars)
    extra = [name for name in vllm.env_vars if not is_secret_name(name)]
    copied = os.environ.get("VLLM_RAY_EXTRA_ENV_VARS_TO_COPY", "")
    if extra:
        os.environ["VLLM_RAY_EXTRA_ENV_VARS_TO_COPY"] = ",".join(filter(None, [copied, *extra]))


def streams_from_object_storage(model: ModelConfig, vllm: VLLMEngineConfig) -> bool:
    """Whether vLLM's Run:ai streamer reads this s3:// model itself (else u2s stages it into the cache)."""
    from u2s.config_base import is_object_store_uri

    load_format = str(vllm.engine_kwargs.get("load_format", vllm.load_format))
    return is_object_store_uri(model.model) and load_format.startswith("runai_streamer")


def model_for_engine(
    model: ModelConfig, vllm: VLLMEngineConfig, storage: StorageConfig | None
) -> ModelConfig:
    """The model as vLLM gets it: a hub id or local path as it is; an s3:// model staged into the local
    model cache, or, with ``load_format: runai_streamer``, the s3:// URI itself (the streamer reads the
    bucket: the package must be installed, and the endpoint reaches it through $AWS_ENDPOINT_URL and
    $RUNAI_STREAMER_S3_ENDPOINT, set here from ``storage.endpoint_url`` unless already set)."""
    from u2s.io.model_store import local_model

    if not streams_from_object_storage(model, vllm):
        return local_model(model, storage)
    try:
        import runai_model_streamer  # noqa: F401
    except ImportError:
        raise ImportError(
            f"load_format {vllm.engine_kwargs.get('load_format', vllm.load_format)!r} needs the "
            "runai-model-streamer package "
            "(pip install 'vllm[runai]'); or use load_format 'auto' to stage the model into the cache"
        ) from None
    if storage is not None and storage.endpoint_url:
        for name in ("AWS_ENDPOINT_URL", "RUNAI_STREAMER_S3_ENDPOINT"):
            os.environ.setdefault(name, storage.endpoint_url)  # the engine core process inherits them
    return model


def fatal_errors() -> tuple[type[BaseException], ...]:
    """Errors after which the engine cannot serve again: vLLM's ``EngineDeadError`` and Ray's list."""
    from vllm.v1.engine.exceptions import EngineDeadError

    errors: tuple[type[BaseException], ...] = (EngineDeadError,)
    try:  # Ray's shared list (internal module): follow it when it grows
        from ray.llm._internal.common.errors import VLLM_FATAL_ERRORS

        errors += tuple(e for e in VLLM_FATAL_ERRORS if e not in errors)
    except ImportError:
        pass
    return errors


def _in_ray_actor() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # no Ray, or no runtime context: not an actor
        return False


def _template_rejected(error: BaseException) -> bool:
    """Whether ``error`` comes from the chat template itself (vLLM wraps jinja's error in a ValueError)."""
    from jinja2 import TemplateError

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, TemplateError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


# -- the engine ---------------------------------------------------------------------------------------


@dataclass
class EngineStats:
    """Request bookkeeping of one engine (what reached vLLM, and how much overlapped)."""

    requests: int = 0
    failed: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    #: Most :meth:`VLLMEngine.generate` calls (batches) that had requests in the engine at the same time.
    peak_calls_in_flight: int = 0


async def _start_engine(args: Any, stat_loggers: list | None) -> Any:
    import vllm

    return vllm.AsyncLLMEngine.from_engine_args(args, stat_loggers=stat_loggers)


async def _stop_engine(engine: Any) -> None:
    engine.shutdown()


def _shutdown(loop: LoopThread, engine: Any) -> None:
    """Stop the engine (its core process) and the loop thread (the finalizer: no reference to the engine)."""
    loop.stop(_stop_engine(engine), timeout=30.0)


class VLLMEngine(Engine):
    """A chat model on vLLM's async engine, in this process (its core in a child process vLLM starts).

    ``system_prompt`` as in :class:`~u2s.stage1.engines.base.Engine` ("auto": merged once the chat
    template has rejected a system role). ``image_size``: images are downscaled to fit this square
    (the caller passes ``vllm.max_image_side or stage1.image_size``). ``storage``: endpoint and model
    cache of an s3:// model (see :func:`model_for_engine`).
    """

    def __init__(
        self,
        model: ModelConfig,
        vllm: VLLMEngineConfig,
        vision: bool,
        image_size: int = 448,
        system_prompt: SystemPrompt = "auto",
        storage: StorageConfig | None = None,
    ) -> None:
        set_engine_env(vllm)  # first: vLLM reads some of them when it is imported
        import vllm as vllm_lib
        from vllm.renderers.params import ChatParams

        silence_input_echo()
        super().__init__(vision, image_size, system_prompt)
        self.model_name = model.model
        self.stats = EngineStats()
        self._calls: Counter[int] = Counter()
        self._call_ids = itertools.count()  # next() is atomic: calls may come from several threads
        self._fatal = fatal_errors()
        self._timeout = vllm.request_timeout_s
        self._chat_params = ChatParams(chat_template_kwargs=dict(vllm.chat_template_kwargs))
        model = model_for_engine(model, vllm, storage)
        args = vllm_lib.AsyncEngineArgs(model=model.model, **engine_kwargs(model, vllm, vision))
        stat_loggers = None
        if vllm.log_engine_metrics and _in_ray_actor():
            from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

            stat_loggers = [RayPrometheusStatLogger]
        self._loop = LoopThread("u2s-vllm-engine")
        try:
            # Built on the loop that will drive it: its output handler and sockets bind to that loop.
            self._engine = self._loop.run(_start_engine(args, stat_loggers))
        except BaseException:
            self._loop.stop()
            raise
        self._finalizer = weakref.finalize(self, _shutdown, self._loop, self._engine)
        config = self._engine.vllm_config
        capacity = config.scheduler_config.max_num_seqs * config.parallel_config.pipeline_parallel_size
        #: Requests in flight per engine (ray.data.llm's bound: a long pending queue slows vLLM down).
        self.max_pending = math.ceil(1.1 * capacity)
        self._slots = self._loop.run(_semaphore(self.max_pending))

    def __repr__(self) -> str:
        return f"VLLMEngine(model={self.model_name!r}, vision={self.vision})"

    def close(self) -> None:
        """Shut the engine down and stop its loop thread (also done when the engine is collected)."""
        self._finalizer()

    # -- requests ------------------------------------------------------------------------------------

    def _generate(
        self, conversations: list[list[dict]], images: list[Image.Image] | None, decoding: Decoding
    ) -> list[str | EngineError]:
        base = self._sampling_params(decoding)
        requests = []
        for i, conversation in enumerate(conversations):
            if self.vision:
                part = {"type": "image_pil", "image_pil": fit_image(images[i], self.image_size)}
                messages = with_image_part(with_parts(conversation), part)
            else:
                messages = text_only(conversation)
            merged = merge_system_into_user(messages) if has_system(messages) else None
            if merged is not None and self._merge_system:
                messages, merged = merged, None
            params = base
            if decoding.temperature > 0 and decoding.seeds is not None:
                params = base.clone()
                params.seed = decoding.seeds[i]  # vLLM seeds each request's own generator
            requests.append((messages, merged if self.system_prompt == "auto" else None, params))
        return self._loop.run(self._run_all(requests, next(self._call_ids)))

    def _sampling_params(self, decoding: Decoding) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        return SamplingParams(
            max_tokens=decoding.max_new_tokens,
            temperature=decoding.temperature,  # 0: greedy
            top_p=1.0,  # plain temperature sampling, as the other engines do
            top_k=0,
            structured_outputs=StructuredOutputsParams(
                json=json.dumps(decoding.schema), disable_any_whitespace=True
            ),
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    async def _run_all(self, requests: list[tuple[list[dict], list[dict] | None, Any]], call: int) -> list:
        import asyncio

        return list(await asyncio.gather(*(self._request(*request, call) for request in requests)))

    async def _request(
        self, messages: list[dict], fallback: list[dict] | None, params: Any, call: int
    ) -> Any:
        """One row: render, generate, and never raise (failures become EngineError) unless the engine died."""
        import asyncio

        async with self._slots:
            self._enter(call)
            try:
                async with asyncio.timeout(self._timeout):  # leaving the generator early aborts the request
                    prompt = await self._render(messages, fallback)
                    final = None
                    async for output in self._engine.generate(prompt, params, uuid.uuid4().hex):
                        final = output
                if final is None or not final.outputs:
                    self.stats.failed += 1
                    return EngineError("no output")
                return final.outputs[0].text
            except self._fatal as e:
                self._die(e)
                raise
            except TimeoutError:
                self.stats.failed += 1
                logger.warning("vllm engine: request timed out after %gs", self._timeout)
                return EngineError("engine timed out")
            except Exception as e:  # this row only; the type, never the message (it may quote the prompt)
                self.stats.failed += 1
                logger.warning("vllm engine: request failed with %s", type(e).__name__)
                return EngineError(type(e).__name__)
            finally:
                self._leave(call)

    async def _render(self, messages: list[dict], fallback: list[dict] | None) -> Any:
        """The engine prompt of one conversation (system policy applied, see the class docstring)."""
        try:
            _, prompts = await self._engine.renderer.render_chat_async([messages], self._chat_params)
        except Exception as e:
            if fallback is None or not _template_rejected(e):
                raise
            _, prompts = await self._engine.renderer.render_chat_async([fallback], self._chat_params)
            if not self._merge_system:
                self._merge_system = True
                logger.info("chat template rejects a system role: merging system prompts into the user turn")
        return prompts[0]

    def _enter(self, call: int) -> None:
        stats = self.stats
        stats.requests += 1
        stats.in_flight += 1
        stats.peak_in_flight = max(stats.peak_in_flight, stats.in_flight)
        self._calls[call] += 1
        stats.peak_calls_in_flight = max(stats.peak_calls_in_flight, len(self._calls))

    def _leave(self, call: int) -> None:
        self.stats.in_flight -= 1
        self._calls[call] -= 1
        if not self._calls[call]:
            del self._calls[call]

    def _die(self, error: BaseException) -> None:
        """A dead engine serves nothing more: the error goes up to the stage, which exits the actor (in
        Ray) after recording the batches in flight (:class:`~u2s.healing.BatchGuard`)."""
        logger.error("vllm engine: fatal %s", type(error).__name__)


async def _semaphore(n: int) -> Any:
    import asyncio

    return asyncio.Semaphore(n)

"""Stage-1 inference engines: one interface, shared prompts and schemas; only transport differs.

Engines are found by name in :data:`ENGINES` (the values of ``stage1.engine`` and
``stage1.calls.<call>.engine``). The built-ins are ``transformers``, ``http`` and ``vllm``; another engine
is an :class:`Engine` subclass plus one call::

    from u2s.stage1.engines import register_engine

    register_engine("my_engine", lambda stage1, model, vision, storage: MyEngine(model, vision=vision))

made in every process that validates a config or builds an engine (the driver, and the pools' workers:
e.g. Ray's ``runtime_env={"worker_process_setup_hook": ...}``). ``vllm_pool=True`` gives the engine's
pools vLLM's pool layout (``stage1.vllm``: batches in flight per actor). Engine modules import their heavy
libraries in constructors, so importing the registry stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from u2s.stage1.engines.base import Engine, generate_validated
from u2s.stage1.engines.registry import ENGINES, EngineFactory, EngineSpec, check_engine, register_engine

if TYPE_CHECKING:
    from u2s.config import ModelConfig, Stage1Config, StorageConfig

__all__ = [
    "ENGINES",
    "Engine",
    "EngineFactory",
    "EngineSpec",
    "build_engine",
    "generate_validated",
    "register_engine",
]


def build_engine(
    stage1: Stage1Config,
    engine: str,
    model: ModelConfig,
    vision: bool,
    storage: StorageConfig | None = None,
) -> Engine:
    """The registered ``engine`` (see :data:`ENGINES`) loaded with ``model`` (a VLM when ``vision``).

    ``storage``: how to reach an s3:// model, and the model cache it is staged into (default: the AWS
    chain, ``$U2S_MODEL_CACHE``)."""
    return ENGINES[check_engine(engine)].factory(stage1, model, vision, storage)


def _transformers(
    stage1: Stage1Config, model: ModelConfig, vision: bool, storage: StorageConfig | None
) -> Engine:
    from u2s.stage1.engines.transformers import TransformersEngine

    return TransformersEngine(
        model,
        vision=vision,
        image_size=stage1.image_size,
        system_prompt=stage1.system_prompt,
        processor_kwargs=stage1.vlm_processor_kwargs if vision else None,
        storage=storage,
    )


def _http(stage1: Stage1Config, model: ModelConfig, vision: bool, storage: StorageConfig | None) -> Engine:
    from u2s.stage1.engines.http import HttpEngine

    if stage1.http is None:
        raise ValueError("engine 'http' needs stage1.http (base_url, ...)")
    served = (stage1.http.vlm_model if vision else stage1.http.llm_model) or model.model
    return HttpEngine(
        stage1.http, served, vision=vision, image_size=stage1.image_size, system_prompt=stage1.system_prompt
    )


def _vllm(stage1: Stage1Config, model: ModelConfig, vision: bool, storage: StorageConfig | None) -> Engine:
    from u2s.stage1.engines.vllm import VLLMEngine

    vllm = stage1.vllm_for(vision)
    return VLLMEngine(
        model,
        vllm,
        vision=vision,
        image_size=vllm.max_image_side or stage1.image_size,
        system_prompt=stage1.system_prompt,
        storage=storage,
    )


register_engine("transformers", _transformers)
register_engine("http", _http)
register_engine("vllm", _vllm, vllm_pool=True)

"""Stage-1 inference engines: one interface, shared prompts and schemas; only transport differs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from u2s.stage1.engines.base import Engine, generate_validated

if TYPE_CHECKING:
    from u2s.config import ModelConfig, Stage1Config, StorageConfig

__all__ = ["Engine", "build_engine", "generate_validated"]


def build_engine(
    stage1: Stage1Config,
    engine: str,
    model: ModelConfig,
    vision: bool,
    storage: StorageConfig | None = None,
) -> Engine:
    """The ``engine`` ("transformers", "http", "vllm") loaded with ``model`` (a VLM when ``vision``).

    ``storage``: how to reach an s3:// model, and the model cache it is staged into (default: the AWS
    chain, ``$U2S_MODEL_CACHE``)."""
    if engine == "transformers":
        from u2s.stage1.engines.transformers import TransformersEngine

        return TransformersEngine(
            model,
            vision=vision,
            image_size=stage1.image_size,
            system_prompt=stage1.system_prompt,
            processor_kwargs=stage1.vlm_processor_kwargs if vision else None,
            storage=storage,
        )
    if engine == "http" and stage1.http is not None:
        from u2s.stage1.engines.http import HttpEngine

        served = (stage1.http.vlm_model if vision else stage1.http.llm_model) or model.model
        return HttpEngine(
            stage1.http,
            served,
            vision=vision,
            image_size=stage1.image_size,
            system_prompt=stage1.system_prompt,
        )
    if engine == "vllm":
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
    raise ValueError(f"unknown stage-1 engine {engine!r}")

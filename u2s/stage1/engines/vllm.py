"""vLLM engines inside the job, through `ray.data.llm` (`build_processor` + `vLLMEngineProcessorConfig`).

A processor sends every row it receives to the model, so the pipeline hands it only the rows a call
wants (see :mod:`u2s.routing`). Each wanted working row travels through the processor packed into one
binary column (:data:`ROW`), so the processor's intermediate columns never mix with the data contract:

    pack (task)  →  preprocess: messages + per-row sampling params (JSON schema)  →  [prepare multimodal]
    →  chat template → tokenize → vLLM engine → detokenize  →  postprocess  →  finish (task): parse,
    validate, fill the call's columns or mark the row ``error``; back to the working schema

Each call's rows, prompt, result model, budget and result handling are those its stage class declares
(:class:`~u2s.stage1.call.ModelCallStage`, read without loading a model), the very ones the other
engines run; message shaping is :mod:`u2s.stage1.engines.messages`. Images go in as ``image_url``
parts with a base64 data URL (downscaled to ``max_image_side``), which ``prepare_multimodal_stage``
parses. A failed request becomes a per-row error (``should_continue_on_error``), never a failed job.
Invalid outputs are marked ``error`` without a retry.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from u2s.schema import mark_error, rows_to_table
from u2s.stage1.call import ModelCallStage
from u2s.stage1.engines.messages import image_data_url as _encode_image
from u2s.stage1.engines.messages import merge_system_into_user, with_image_url
from u2s.stage1.schemas import OutputError, json_schema, parse_output

if TYPE_CHECKING:
    import ray.data
    from pydantic import BaseModel

    from u2s.config import GenerationConfig, ModelConfig, Resources, Stage1Config, VLLMEngineConfig

logger = logging.getLogger(__name__)

#: The packed working row (pickled dict) that rides through the processor untouched.
ROW = "__u2s_row"
ERROR_COLUMN = "__inference_error__"
#: CPUs of the light pack/finish tasks around a processor.
TASK_CPUS = 0.25


@dataclass(frozen=True)
class VLLMCall:
    """One stage-1 call as the vLLM path runs it: which rows, what prompt and schema, where results go
    (built by :func:`stage1_call` from the stage class)."""

    name: str
    vision: bool
    result_cls: type[BaseModel]
    generation: GenerationConfig
    wants: Callable[[dict], bool]
    messages: Callable[[dict], list[dict]]
    apply: Callable[[dict, Any], None]


# -- the calls ---------------------------------------------------------------------------------------


def stage1_call(stage1: Stage1Config, stage_cls: type[ModelCallStage]) -> VLLMCall:
    """The :class:`VLLMCall` doing what stage class ``stage_cls`` does: its own ``wants``, prompt,
    result model, budget and ``apply`` (read from the class; no model is loaded).

    Supported: every :class:`~u2s.stage1.call.ModelCallStage` whose rows are one call each under
    ``stage1`` (not InspectStage with ``inspect_mode: per_criterion``).
    """
    if not (isinstance(stage_cls, type) and issubclass(stage_cls, ModelCallStage)):
        raise ValueError(f"no vLLM path for stage {getattr(stage_cls, '__name__', stage_cls)}")
    if not stage_cls.single_call(stage1):
        raise ValueError(f"{stage_cls.__name__} asks several questions per row here: no vLLM path")
    return VLLMCall(
        name=stage_cls.name,
        vision=stage_cls.vision,
        result_cls=stage_cls.result_model,
        generation=stage_cls.generation(stage1),
        wants=stage_cls.unloaded(stage1).wants,
        messages=partial(stage_cls.conversation, stage1),
        apply=stage_cls.apply,
    )


# -- engine and processor settings ------------------------------------------------------------------


def engine_kwargs(model: ModelConfig, vllm: VLLMEngineConfig, vision: bool) -> dict[str, Any]:
    """vLLM engine arguments from the model and engine configs (``vllm.engine_kwargs`` wins)."""
    kwargs: dict[str, Any] = {
        "dtype": vllm.dtype or model.dtype,
        "tensor_parallel_size": vllm.tensor_parallel_size,
        "gpu_memory_utilization": vllm.gpu_memory_utilization,
        "enable_prefix_caching": vllm.enable_prefix_caching,
        "enforce_eager": vllm.enforce_eager,
        "trust_remote_code": model.trust_remote_code,
        "structured_outputs_config": dict(vllm.structured_outputs_config),
    }
    optional = {
        "revision": model.revision,
        "max_model_len": vllm.max_model_len,
        "max_num_seqs": vllm.max_num_seqs,
        "kv_cache_memory_bytes": vllm.kv_cache_memory_bytes,
    }
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    if vision:
        kwargs["limit_mm_per_prompt"] = dict(vllm.limit_mm_per_prompt)
    kwargs.update(vllm.engine_kwargs)
    return kwargs


def placement_group_config(vllm: VLLMEngineConfig, resources: Resources) -> dict[str, Any] | None:
    """The engine's placement group: as configured; else CPU bundles when the stage asks for no GPU.

    Without one, ray.data.llm reserves a GPU per tensor-parallel worker, which a CPU-only cluster can
    never grant (the job would wait forever).
    """
    if vllm.placement_group_config is not None:
        return dict(vllm.placement_group_config)
    if resources.num_gpus == 0:
        cpus = max(1.0, resources.num_cpus)
        return {"bundles": [{"CPU": cpus} for _ in range(vllm.tensor_parallel_size)]}
    return None


def processor_config(model: ModelConfig, vllm: VLLMEngineConfig, resources: Resources, vision: bool) -> Any:
    """The `vLLMEngineProcessorConfig` of one call's engine pool."""
    from ray.data.llm import vLLMEngineProcessorConfig

    cpu_stage: dict[str, Any] = {"enabled": True}
    if vllm.cpu_stage_num_cpus is not None:
        cpu_stage["num_cpus"] = vllm.cpu_stage_num_cpus
    return vLLMEngineProcessorConfig(
        model_source=model.model,
        engine_kwargs=engine_kwargs(model, vllm, vision),
        batch_size=resources.batch_size,
        # A fixed size n is (n, n): ray.data.llm would read a plain n as an autoscaling (1, n).
        concurrency=resources.pool_bounds(),
        accelerator_type=resources.accelerator_type,
        placement_group_config=placement_group_config(vllm, resources),
        runtime_env={"env_vars": dict(vllm.env_vars)} if vllm.env_vars else None,
        max_concurrent_batches=vllm.max_concurrent_batches,
        should_continue_on_error=True,
        log_engine_metrics=vllm.log_engine_metrics,
        chat_template_stage=dict(cpu_stage),
        tokenize_stage=dict(cpu_stage),
        detokenize_stage=dict(cpu_stage),
        prepare_multimodal_stage=dict(cpu_stage) if vision else False,
    )


# -- per-row functions (run in Ray tasks) -----------------------------------------------------------


def image_data_url(data: bytes | None, max_side: int, image_format: str) -> str:
    """Decode, downscale to fit ``max_side``×``max_side`` and re-encode as a base64 data URL.

    Raises :class:`u2s.io.decode.DecodeError` for bytes that are not a loadable image.
    """
    from u2s.io.decode import load_rgb

    return _encode_image(load_rgb(data), max_side, image_format, quality=95)


def sampling_params(schema_json: str, max_tokens: int) -> dict[str, Any]:
    """Greedy decoding constrained to a JSON schema (vLLM `SamplingParams` keyword arguments)."""
    return {
        "temperature": 0.0,
        "max_tokens": max_tokens,
        "structured_outputs": {"json": schema_json, "disable_any_whitespace": True},
    }


def pack(batch: pa.Table) -> pa.Table:
    """Working rows → one binary column (each row pickled); the processor carries it untouched."""
    return pa.table({ROW: pa.array([pickle.dumps(r) for r in batch.to_pylist()], pa.binary())})


class Preprocess:
    """Processor preprocess: one row's chat messages and sampling params (JSON schema)."""

    def __init__(self, call: VLLMCall, max_image_side: int, image_format: str) -> None:
        self.call = call
        self.max_image_side = max_image_side
        self.image_format = image_format
        self.schema_json = json.dumps(json_schema(call.result_cls))

    def __call__(self, packed: dict) -> dict:
        from u2s.io.decode import DecodeError

        row = pickle.loads(packed[ROW])
        messages = self.call.messages(row)
        url = None
        if self.call.vision:
            try:
                url = image_data_url((row.get("image") or {}).get("bytes"), self.max_image_side,
                                     self.image_format)  # fmt: skip
            except DecodeError as e:
                # Failed here, before the model; a one-token text-only request keeps the row in step.
                mark_error(row, self.call.name, f"image: {e}")
                return {ROW: pickle.dumps(row), "messages": with_image_url(messages, None),
                        "sampling_params": sampling_params(self.schema_json, 1)}  # fmt: skip
        max_tokens = self.call.generation.max_new_tokens
        return {"messages": with_image_url(messages, url),
                "sampling_params": sampling_params(self.schema_json, max_tokens)}  # fmt: skip


def postprocess(row: dict) -> dict:
    """Processor postprocess: keep the packed row, the output text and the request's seconds."""
    return {ROW: row[ROW], "generated_text": row.get("generated_text"),
            "time_taken_llm": row.get("time_taken_llm")}  # fmt: skip


def _inference_error(message: str) -> str:
    """A content-free reason from ray.data.llm's error text (``Type: message``): the type only."""
    kind = message.split(":", 1)[0].strip()
    return f"inference failed ({kind})" if kind.isidentifier() else "inference failed"


def finish(batch: pa.Table, call: VLLMCall) -> pa.Table:
    """Processor output → working rows: parse and validate each output, fill the call's columns."""
    names = set(batch.column_names)
    packed = batch.column(ROW).to_pylist()
    texts = batch.column("generated_text").to_pylist() if "generated_text" in names else [None] * len(packed)
    errors = batch.column(ERROR_COLUMN).to_pylist() if ERROR_COLUMN in names else [None] * len(packed)
    seconds = (
        batch.column("time_taken_llm").to_pylist() if "time_taken_llm" in names else [None] * len(packed)
    )
    rows = []
    for blob, text, error, took in zip(packed, texts, errors, seconds, strict=True):
        row = pickle.loads(blob)
        rows.append(row)
        if row["status"] is not None:  # failed before the model (see Preprocess)
            continue
        if error:
            mark_error(row, call.name, _inference_error(error))
        else:
            try:
                call.apply(row, parse_output(text or "", call.result_cls))
            except OutputError as e:
                mark_error(row, call.name, str(e))
        if took is not None and took >= 0:
            row["timings"] = {**(row["timings"] or {}), call.name: float(took)}
    return rows_to_table(rows)


# -- the processor ----------------------------------------------------------------------------------


def system_role_supported(model: ModelConfig) -> bool:
    """Whether the model's chat template renders a system message (probed once, on the driver).

    A model whose files cannot be read here keeps the system role (the engine will then say why).
    """
    from jinja2 import TemplateError

    try:
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(
            model.model, revision=model.revision, trust_remote_code=model.trust_remote_code
        )
        probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
        tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    except TemplateError:
        return False
    except Exception:  # no tokenizer or template reachable from the driver
        logger.info("could not probe the chat template of a stage-1 model; keeping the system role")
    return True


def _merging_system(messages: Callable[[dict], list[dict]]) -> Callable[[dict], list[dict]]:
    return lambda row: merge_system_into_user(messages(row))


def build_processor(stage1: Stage1Config, call: VLLMCall, resources: Resources) -> Any:
    """The ray.data.llm `Processor` of ``call``: packed rows in, packed rows + outputs out.

    With ``stage1.system_prompt: auto``, system prompts are merged into the user turn when the model's
    chat template rejects a system role (as the transformers engine does).
    """
    from ray.data.llm import build_processor as build

    model = stage1.vlm if call.vision else stage1.llm
    if stage1.system_prompt == "auto" and not system_role_supported(model):
        logger.info("chat template rejects a system role: merging system prompts into the user turn")
        call = replace(call, messages=_merging_system(call.messages))
    vllm = stage1.vllm_for(call.vision)
    config = processor_config(model, vllm, resources, call.vision)
    map_kwargs = {"num_cpus": vllm.cpu_stage_num_cpus} if vllm.cpu_stage_num_cpus is not None else None
    return build(
        config,
        preprocess=Preprocess(call, vllm.max_image_side or stage1.image_size, vllm.image_format),
        postprocess=postprocess,
        preprocess_map_kwargs=map_kwargs,
        postprocess_map_kwargs=map_kwargs,
        builder_kwargs={"chat_template_kwargs": vllm.chat_template_kwargs}
        if vllm.chat_template_kwargs
        else None,
    )


def apply_call(
    ds: ray.data.Dataset, stage1: Stage1Config, call: VLLMCall, resources: Resources
) -> ray.data.Dataset:
    """Run ``call`` on every row of ``ds`` (all of them wanted) with vLLM; returns working rows."""
    batch_size = resources.batch_size
    ds = ds.map_batches(pack, batch_size=batch_size, batch_format="pyarrow", num_cpus=TASK_CPUS)
    ds = build_processor(stage1, call, resources)(ds)
    return ds.map_batches(
        finish, fn_kwargs={"call": call}, batch_size=batch_size, batch_format="pyarrow", num_cpus=TASK_CPUS
    )

"""vLLM engines inside the job, through `ray.data.llm` (`build_processor` + `vLLMEngineProcessorConfig`).

A processor sends every row it receives to the model, so the pipeline hands it only the rows a call
wants (see :mod:`u2s.routing`). Each wanted working row travels through the processor packed into one
binary column (:data:`ROW`), so the processor's intermediate columns never mix with the data contract:

    pack (task)  →  preprocess: messages + per-row sampling params (JSON schema)  →  [prepare multimodal]
    →  chat template → tokenize → vLLM engine → detokenize  →  postprocess  →  finish (task): parse,
    validate, fill the call's columns or mark the row ``error``; back to the working schema

Prompts, schemas and parsing are the ones every engine shares (:mod:`u2s.stage1.prompts`,
:mod:`u2s.stage1.schemas`). Images go in as ``image_url`` parts with a base64 data URL (downscaled to
``max_image_side``), which ``prepare_multimodal_stage`` parses. A failed request becomes a per-row error
(``should_continue_on_error``), never a failed job. Invalid outputs are marked ``error`` without a retry.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from u2s.schema import Status, mark_error, rows_to_table
from u2s.stage1.schemas import (
    CombineResult,
    DescribeResult,
    FusedFlagged,
    FusedResult,
    InspectResult,
    InstructResult,
    OutputError,
    json_schema,
    parse_output,
)

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
    """One stage-1 call as the vLLM path runs it: which rows, what prompt and schema, where results go."""

    name: str
    vision: bool
    result_cls: type[BaseModel]
    generation: GenerationConfig
    wants: Callable[[dict], bool]
    messages: Callable[[dict], list[dict]]
    apply: Callable[[dict, Any], None]


# -- the calls ---------------------------------------------------------------------------------------


def _stage_wants(stage_cls: type, stage1: Stage1Config) -> Callable[[dict], bool]:
    """The stage class's own ``wants`` (one routing rule for every engine), without loading a model."""
    stage = stage_cls.__new__(stage_cls)
    stage.config = stage1
    return stage.wants


# The appliers mirror the stage classes' `process` (which also run the transformers/http engines).


def _apply_inspect(row: dict, result: InspectResult) -> None:
    # Flagged when the model says TRUE or names any category; unflagged rows are kept.
    row["categories"] = [c.value for c in result.categories]
    row["privacy_flag"] = result.privacy_flag or bool(row["categories"])
    if not row["privacy_flag"]:
        row["status"] = Status.KEPT.value


def _apply_fused(row: dict, result: FusedResult) -> None:
    record = result.root
    if not isinstance(record, FusedFlagged):
        row.update(privacy_flag=False, categories=[], status=Status.KEPT.value)
        return
    row["privacy_flag"] = True
    row["categories"] = [c.value for c in record.categories]
    _apply_describe(row, record)


def _apply_describe(row: dict, result: DescribeResult | FusedFlagged) -> None:
    row["review"] = [item.model_dump(mode="json") for item in result.review]
    row["private_caption"] = result.private_caption
    row["public_caption"] = result.public_caption


def _apply_instruct(row: dict, result: InstructResult) -> None:
    row["edit_instruction"] = result.edit_instruction


def _apply_combine(row: dict, result: CombineResult) -> None:
    row["combined_caption"] = result.combined_caption


def stage1_call(stage1: Stage1Config, stage_cls: type) -> VLLMCall:
    """The :class:`VLLMCall` doing what stage class ``stage_cls`` does, with the same prompts and schema.

    Supported: InspectStage (single mode), FusedInspectStage, DescribeStage, InstructStage, CombineStage.
    """
    from u2s.stage1 import prompts

    hint = stage1.default_class_hint
    policy = stage1.system_prompt

    def messages(build: Callable[[dict], list[dict]]) -> Callable[[dict], list[dict]]:
        return lambda row: prompts.apply_system_prompt([build(row)], policy)[0]

    kind = stage_cls.__name__
    if kind == "InspectStage" and stage1.inspect_mode == "per_criterion":
        raise ValueError("inspect_mode 'per_criterion' has no vLLM path")
    specs: dict[str, tuple] = {
        "InspectStage": (True, InspectResult, stage1.inspect_generation,
                         lambda row: prompts.inspect_messages(), _apply_inspect),
        "FusedInspectStage": (True, FusedResult, stage1.describe_generation,
                              lambda row: prompts.fused_messages(row["label"] or hint), _apply_fused),
        "DescribeStage": (True, DescribeResult, stage1.describe_generation,
                          lambda row: prompts.describe_messages(row["label"] or hint), _apply_describe),
        "InstructStage": (False, InstructResult, stage1.instruct_generation,
                          lambda row: prompts.instruct_messages(row["public_caption"]), _apply_instruct),
        "CombineStage": (False, CombineResult, stage1.combine_generation,
                         lambda row: prompts.combine_messages(row["public_caption"], row["edit_instruction"],
                                                              row["label"] or hint), _apply_combine),
    }  # fmt: skip
    if kind not in specs:
        raise ValueError(f"no vLLM path for stage {kind}")
    vision, result_cls, generation, build, apply = specs[kind]
    return VLLMCall(stage_cls.name, vision, result_cls, generation, _stage_wants(stage_cls, stage1),
                    messages(build), apply)  # fmt: skip


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
    from u2s.stage1.engines.transformers import fit_image

    img = fit_image(load_rgb(data), max_side)
    buf = io.BytesIO()
    img.save(buf, format=image_format, **({"quality": 95} if image_format == "JPEG" else {}))
    mime = "jpeg" if image_format == "JPEG" else "png"
    return f"data:image/{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def with_image_url(messages: list[dict], url: str | None) -> list[dict]:
    """``{"type": "image"}`` parts become ``image_url`` parts holding ``url`` (dropped when None)."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") != "image":
                    parts.append(part)
                elif url is not None:
                    parts.append({"type": "image_url", "image_url": {"url": url}})
            content = parts
        out.append({**message, "content": content})
    return out


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
    from u2s.stage1.prompts import merge_system_into_user

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

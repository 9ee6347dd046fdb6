"""``--resume`` is refused only when a setting that decides a row's outcome changed: every config field is
classified (outcome or runtime), runtime knobs may change, and a refusal names the settings that changed."""

from __future__ import annotations

import typing

import pytest
from pydantic import BaseModel

from u2s.config import JobConfig, load_config
from u2s.run_record import (
    OUTCOME_SETTINGS,
    RUNTIME_SETTINGS,
    ResumeRefused,
    check_resumable,
    classify,
    config_fingerprint,
)

INPUT = "3:1234"


def _models(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models(arg)]


def _fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every leaf field of the config model, as a dotted path (list items share their list's path)."""
    paths = []
    for name, field in model.model_fields.items():
        nested = _models(field.annotation)
        paths += [p for sub in nested for p in _fields(sub, f"{prefix}{name}.")] or [f"{prefix}{name}"]
    return paths


def _cfg(*overrides: str) -> JobConfig:
    return load_config(preset="cpu-tiny", overrides=["input.uri=/data/images", *overrides])


def _record(cfg: JobConfig) -> dict:
    """What a run's full record keeps for resuming (see ``u2s.pipeline._Records``)."""
    return {"config_fingerprint": config_fingerprint(cfg), "input_fingerprint": INPUT,
            "config": cfg.model_dump(mode="json")}  # fmt: skip


def test_every_config_field_is_classified_as_outcome_or_runtime():
    fields = _fields(JobConfig)
    assert len(fields) > 200 and "run.max_error_fraction" in fields
    unclassified = [path for path in fields if classify(path) is None]
    assert unclassified == [], (
        "decide for each new field whether it changes what a row becomes: add it to OUTCOME_SETTINGS "
        f"or RUNTIME_SETTINGS in u2s/run_record.py: {unclassified}"
    )
    for pattern in OUTCOME_SETTINGS | RUNTIME_SETTINGS:  # no entry outlives the field it named
        parts = pattern.split(".")
        assert any(
            all(p in ("*", name) for p, name in zip(parts, path.split("."), strict=False))
            and len(parts) <= len(path.split("."))
            for path in fields
        ), pattern


@pytest.mark.parametrize(
    "change",
    [
        "stage1.vllm.gpu_memory_utilization=0.5",
        "stage1.vllm.max_num_seqs=2",
        "stage1.vllm.kv_cache_memory_bytes=33554432",
        "stage1.vllm.max_concurrent_batches=1",
        "stage1.vllm.enforce_eager=false",
        "stage1.vllm.engine_kwargs={max_num_batched_tokens: 4096}",
        "stage1.vllm.env_vars={VLLM_CPU_KVCACHE_SPACE: '1'}",
        "stage1.calls.inspect.resources.pool_size=4",
        "stage1.vlm.device=cuda",
        "stage2.compile=true",
        "stage2.resources.num_gpus=1",
        "storage.max_attempts=3",
        "ray.num_cpus=8",
        "output.rows_per_file=10",
        "output.uri=/elsewhere/safe",
        "run.max_error_fraction=0.9",
        "stage2.max_batch=2",
    ],
)
def test_runtime_knobs_may_change_on_resume(change):
    check_resumable(_record(_cfg()), _cfg(change), INPUT)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("stage1.vlm.model=org/another-vlm", "stage1.vlm.model"),
        ("stage1.llm.revision=0123456789abcdef0123456789abcdef01234567", "stage1.llm.revision"),
        ("stage1.calls.describe.generation.max_new_tokens=64", "describe.generation.max_new_tokens"),
        ("stage1.calls.inspect.generation.retry_temperature=0.2", "stage1.calls.inspect.generation"),
        ("stage1.mode=fused", "stage1.mode"),
        ("stage1.vllm.max_model_len=1024", "stage1.vllm.max_model_len"),
        ("stage1.vllm.engine_kwargs={quantization: fp8}", "stage1.vllm.engine_kwargs"),
        ("stage2.seed=7", "stage2.seed"),
        ("stage2.instruct_pix2pix.num_inference_steps=3", "stage2.instruct_pix2pix.num_inference_steps"),
        ("stage2.editor=blur", "stage2.editor"),
        ("stage2.aspect_buckets=[[1, 1]]", "stage2.aspect_buckets"),
        ("decode.max_pixels=1000000", "decode.max_pixels"),
        ("output.metadata=keep", "output.metadata"),
        ("output.publish=[]", "output.publish"),
    ],
)  # fmt: skip
def test_outcome_settings_refuse_resume_naming_what_changed(change, named):
    with pytest.raises(ResumeRefused) as refused:
        check_resumable(_record(_cfg()), _cfg(change), INPUT)
    message = str(refused.value)
    assert named in message and "--force" in message
    assert "stage1.vllm.gpu_memory_utilization" not in message


def test_a_changed_input_or_no_record_refuses_resume():
    cfg = _cfg()
    with pytest.raises(ResumeRefused, match="input listing changed"):
        check_resumable(_record(cfg), cfg, "4:999")
    with pytest.raises(ResumeRefused, match="no run record"):
        check_resumable(None, cfg, INPUT)
    check_resumable(_record(cfg), cfg, INPUT)


def test_records_are_compared_by_their_settings_not_only_their_hash():
    cfg = _cfg()
    older = {**_record(cfg), "config_fingerprint": "an earlier version's hash of the same settings"}
    check_resumable(older, cfg, INPUT)
    bare = {"config_fingerprint": config_fingerprint(cfg), "input_fingerprint": INPUT}  # no config kept
    check_resumable(bare, cfg, INPUT)
    with pytest.raises(ResumeRefused, match="outcome changed"):
        check_resumable(bare, _cfg("stage2.seed=7"), INPUT)

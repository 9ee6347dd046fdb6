"""The VLM through vLLM (ray.data.llm with prepare_multimodal_stage): images in as data URLs, JSON out.

Needs CUDA and torchvision (vLLM's multimodal models import it; the CPU environment has no build of
it), and the GPU `vllm` wheel with ray 2.60; skipped elsewhere.
"""

from __future__ import annotations

import io

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM's VLM path needs CUDA"),
]


def _png(width: int, height: int, seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = (np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_inspect_and_describe_through_vllm_return_schema_valid_rows(ray_cluster, tiny_models):
    pytest.importorskip("torchvision", reason="vLLM's multimodal models import torchvision")
    import ray.data

    from u2s.config import GenerationConfig, ModelConfig, Resources, Stage1Config, VLLMEngineConfig
    from u2s.schema import mark_error, new_row, rows_to_table
    from u2s.stage1.describe import DescribeStage
    from u2s.stage1.engines import vllm as v
    from u2s.stage1.inspect import InspectStage

    model = ModelConfig(model=str(tiny_models["vlm"]), dtype="bfloat16")
    stage1 = Stage1Config(
        engine="vllm", vlm=model, llm=model, image_size=112, default_class_hint="photo",
        inspect_generation=GenerationConfig(max_new_tokens=512),
        describe_generation=GenerationConfig(max_new_tokens=2048),
        vllm=VLLMEngineConfig(max_model_len=4096, gpu_memory_utilization=0.3, enforce_eager=True),
    )  # fmt: skip
    pool = Resources(pool_size=1, batch_size=4, num_cpus=1, num_gpus=1)
    rows = [new_row(f"img-{i}", f"mem://{i}.png", "photo", _png(60 + 7 * i, 40 + 5 * i, i)) for i in range(6)]
    ds = ray.data.from_arrow(rows_to_table(rows))

    inspected = v.apply_call(ds, stage1, v.stage1_call(stage1, InspectStage), pool).take_all()
    assert sorted(r["id"] for r in inspected) == sorted(r["id"] for r in rows)
    for row in inspected:
        if row["status"] == "error":
            assert row["error"].startswith("inspect: ")
        else:
            assert isinstance(row["privacy_flag"], bool) and row["timings"]["inspect"] > 0
    assert any(row["status"] != "error" for row in inspected), "constrained decoding gave no valid answer"

    # Describe every row (forced flagged), so the second VLM call is exercised whatever inspect said.
    flagged = [dict(r, status=None, error=None, privacy_flag=True) for r in inspected]
    mark_error(flagged[-1], "inspect", "forced")  # an error row is not wanted: the caller filters it
    call = v.stage1_call(stage1, DescribeStage)
    todo = ray.data.from_arrow(rows_to_table([r for r in flagged if call.wants(r)]))
    described = v.apply_call(todo, stage1, call, pool).take_all()
    assert len(described) == len(flagged) - 1
    valid = [r for r in described if r["status"] is None]
    for row in described:
        if row["status"] == "error":
            assert row["error"].startswith("describe: ")
    for row in valid:
        assert row["private_caption"] and row["public_caption"] and isinstance(row["review"], list)

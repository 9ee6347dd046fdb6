"""vLLM on GPUs: the VLM calls (images as PIL parts, JSON out) and tensor parallelism in a Ray Data pool.

Needs CUDA, torchvision (vLLM's multimodal models import it; the CPU environment has no build of it)
and the GPU `vllm` wheel with ray 2.60; the tensor-parallel test also needs 2 GPUs. Skipped elsewhere,
with the reason.
"""

from __future__ import annotations

import io

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM on GPUs needs CUDA"),
]


def _png(width: int, height: int, seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = (np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _stage1(tiny_models, **vllm):
    from u2s.config import GenerationConfig, ModelConfig, Stage1Config, VLLMEngineConfig

    return Stage1Config(
        engine="vllm", image_size=112, default_class_hint="photo",
        vlm=ModelConfig(model=str(tiny_models["vlm"]), dtype="bfloat16"),
        llm=ModelConfig(model=str(tiny_models["llm"]), dtype="bfloat16"),
        inspect_generation=GenerationConfig(max_new_tokens=512),
        describe_generation=GenerationConfig(max_new_tokens=2048),
        instruct_generation=GenerationConfig(max_new_tokens=1024),
        vllm=VLLMEngineConfig(max_model_len=4096, gpu_memory_utilization=0.3, enforce_eager=True, **vllm),
    )  # fmt: skip


def test_inspect_and_describe_through_vllm_return_schema_valid_rows(tiny_models):
    pytest.importorskip("torchvision", reason="vLLM's multimodal models import torchvision")
    from u2s.schema import mark_error, new_row, rows_to_table
    from u2s.stage1.describe import DescribeStage
    from u2s.stage1.engines import build_engine
    from u2s.stage1.inspect import InspectStage

    stage1 = _stage1(tiny_models)
    engine = build_engine(stage1, stage1.vlm, vision=True)
    rows = [new_row(f"img-{i}", f"mem://{i}.png", "photo", _png(60 + 7 * i, 40 + 5 * i, i)) for i in range(6)]
    rows.append(new_row("broken", "mem://broken.png", "photo", b"not an image"))
    try:
        inspected = InspectStage(stage1, engine=engine)(rows_to_table(rows)).to_pylist()
        assert [r["id"] for r in inspected] == [r["id"] for r in rows]
        assert inspected[-1]["error"].startswith("inspect: image:")  # failed before the engine
        for row in inspected[:-1]:
            if row["status"] == "error":
                assert row["error"].startswith("inspect: ")
            else:
                assert isinstance(row["privacy_flag"], bool) and row["timings"]["inspect"] > 0
        assert any(r["status"] != "error" for r in inspected[:-1]), "no valid answer under constraints"

        # Describe every row (forced flagged), so the second VLM call runs whatever inspect said.
        flagged = [dict(r, status=None, error=None, privacy_flag=True) for r in inspected[:-1]]
        mark_error(flagged[-1], "inspect", "forced")  # not wanted: passes through untouched
        table = rows_to_table(flagged)
        described = DescribeStage(stage1, engine=engine)(table).to_pylist()
        assert described[-1] == table.to_pylist()[-1]
        for row in described[:-1]:
            if row["status"] == "error":
                assert row["error"].startswith("describe: ")
            else:
                assert row["private_caption"] and row["public_caption"] and isinstance(row["review"], list)
        assert engine.stats.failed == 0
    finally:
        engine.close()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="tensor parallelism 2 needs 2 GPUs")
def test_tensor_parallel_engine_runs_in_its_actors_placement_group(ray_cluster, tiny_models):
    """TP = 2: the actor and vLLM's two Ray workers share one placement group of 2 GPU bundles."""
    import ray.data
    from ray.util import placement_group_table

    from u2s.config import Resources
    from u2s.map_pool import map_pool
    from u2s.schema import new_row, rows_to_table
    from u2s.stage1.engines.vllm_pool import pool_kwargs, remove_placement_groups
    from u2s.stage1.instruct import InstructStage

    if ray.cluster_resources().get("GPU", 0) < 2:
        pytest.skip("the test Ray cluster sees fewer than 2 GPUs")
    stage1 = _stage1(tiny_models, tensor_parallel_size=2)
    rows = []
    for i in range(8):
        row = new_row(f"r{i}", f"mem://{i}", None, None)
        row.update(privacy_flag=True, categories=["people"], public_caption=f"A person {i} on a bench.")
        rows.append(row)
    pool = pool_kwargs(Resources(pool_size=1, batch_size=4, num_cpus=1, num_gpus=1), stage1.vllm)
    before = set(placement_group_table())
    ds = map_pool(ray.data.from_arrow(rows_to_table(rows)), InstructStage, pool,
                  fn_constructor_kwargs={"stage1": stage1}, batch_format="pyarrow")  # fmt: skip
    out = ds.take_all()
    assert sorted(r["id"] for r in out) == [r["id"] for r in rows]
    assert any(r["status"] is None and r["edit_instruction"] for r in out)
    groups = [g for key, g in placement_group_table().items() if key not in before]
    assert [list(g["bundles"].values()) for g in groups] == [[{"GPU": 1.0, "CPU": 1.0}] * 2]
    assert remove_placement_groups() == 1

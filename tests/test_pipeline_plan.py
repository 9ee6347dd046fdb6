"""The plan's wiring: stage order, actor pools and per-stage resources come from the config.

Built lazily for the GPU `paper` preset (nothing executes, no model loads), so it runs on CPU. Ray Data
has no public API that lists a plan's operators with their compute strategy, so :func:`_map_operators`
walks the logical plan.
"""

from __future__ import annotations

from PIL import Image

from u2s.config import load_config
from u2s.io.ids import IdKey
from u2s.io.listing import list_input
from u2s.pipeline import build_dataset, stage_pools


def _map_operators(ds) -> list:
    """Logical map operators from source to sink, in order."""
    ops, node = [], ds._logical_plan.dag
    while node is not None:
        if hasattr(node, "fn"):
            ops.append(node)
        deps = node.input_dependencies
        node = deps[0] if deps else None
    return ops[::-1]


def _fn_name(op) -> str:
    return getattr(op.fn, "__name__", type(op.fn).__name__)


def _plan(tmp_path, *overrides: str):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    cfg = load_config(preset="paper", overrides=[f"input.uri={tmp_path}", *overrides])
    listing = list_input(cfg.input, cfg.storage, cfg.ray.decode, IdKey.generate())
    return cfg, _map_operators(build_dataset(cfg, listing))


def test_paper_plan_has_one_gpu_pool_per_model(tmp_path, ray_cluster):
    import ray.data

    cfg, ops = _plan(
        tmp_path, "stage1.calls.inspect.resources.accelerator_type=H100", "stage2.resources.batch_size=6",
        "stage2.verify.checks=[]",  # the verification pools after the editor: tests/test_pipeline_pools.py
    )  # fmt: skip
    names = [_fn_name(op) for op in ops]
    assert names[-3:] == ["VisionCallPool", "TextCallPool", "EditStage"]
    assert names.index("_stateless") < names.index("VisionCallPool")  # decode runs first, as tasks
    assert not isinstance(ops[names.index("_stateless")].compute, ray.data.ActorPoolStrategy)
    vision, text, edit = ops[-3:]
    assert vision.fn_constructor_kwargs["pool"].calls == ("inspect", "describe")  # the VLM loads once
    assert text.fn_constructor_kwargs["pool"].calls == ("instruct",)
    expected = [
        (vision, cfg.stage1.calls.inspect.resources),
        (text, cfg.stage1.calls.instruct.resources),
        (edit, cfg.stage2.resources),
    ]
    for op, resources in expected:
        assert isinstance(op.compute, ray.data.ActorPoolStrategy)
        assert (op.compute.min_size, op.compute.max_size) == resources.pool_bounds()
        assert op.ray_remote_args["num_gpus"] == 1
        assert op.ray_remote_args["num_cpus"] == resources.num_cpus
        assert op.batch_size == resources.batch_size
    assert vision.ray_remote_args["accelerator_type"] == "H100"
    assert vision.compute.min_size == 1 < vision.compute.max_size  # GPU pools start small and grow
    assert edit.batch_size == 6 and edit.fn_constructor_kwargs["stage2"] == cfg.stage2
    pools = stage_pools(cfg)
    assert list(pools) == ["decode", "inspect+describe", "instruct", "edit", "write"]
    assert pools["inspect+describe"] == cfg.stage1.calls.inspect.resources


def test_a_call_with_its_own_resources_gets_its_own_pool(tmp_path, ray_cluster):
    _, ops = _plan(tmp_path, "stage1.calls.describe.resources={pool_size: 3, num_gpus: 1}")
    pools = [op.fn_constructor_kwargs["pool"] for op in ops if _fn_name(op).endswith("CallPool")]
    assert [pool.calls for pool in pools] == [("inspect",), ("describe",), ("instruct",)]
    assert pools[1].resources.pool_size == 3


def test_fused_mode_has_one_vision_call_and_combine_joins_the_llm_pool(tmp_path, ray_cluster):
    _, ops = _plan(tmp_path, "stage1.mode=fused", "stage1.combine=true")
    pools = [op.fn_constructor_kwargs["pool"] for op in ops if _fn_name(op).endswith("CallPool")]
    assert [pool.calls for pool in pools] == [("inspect",), ("instruct", "combine")]

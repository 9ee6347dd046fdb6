"""The plan's wiring: stage order, actor pools and per-stage resources come from the config.

Built lazily for the GPU `paper` preset on the transformers engine (single streaming pass: nothing
executes, no model loads), so it runs on CPU. The vLLM engine's wiring: tests/stage1/test_vllm_engine.py.
"""

from __future__ import annotations

from PIL import Image

from u2s.config import load_config
from u2s.pipeline import build_dataset


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


def test_paper_plan_has_one_gpu_pool_per_model_stage(tmp_path, ray_cluster):
    import ray.data

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    cfg = load_config(
        preset="paper",
        overrides=[
            f"input.uri={tmp_path}",
            "stage1.engine=transformers",
            "stage1.inspect.accelerator_type=H100",
            "stage1.describe.pool_size=3",
            "stage2.resources.batch_size=6",
        ],
    )
    ops = {_fn_name(op): op for op in _map_operators(build_dataset(cfg))}
    names = list(ops)
    model_stages = ["InspectStage", "DescribeStage", "InstructStage", "EditStage"]
    assert names[-4:] == model_stages
    assert names.index("_stateless") < names.index("InspectStage")  # decode runs first, as tasks
    assert not isinstance(ops["_stateless"].compute, ray.data.ActorPoolStrategy)

    expected = {
        "InspectStage": cfg.stage1.inspect,
        "DescribeStage": cfg.stage1.describe,
        "InstructStage": cfg.stage1.instruct,
        "EditStage": cfg.stage2.resources,
    }
    for name, resources in expected.items():
        op = ops[name]
        assert isinstance(op.compute, ray.data.ActorPoolStrategy)
        assert (op.compute.min_size, op.compute.max_size) == resources.pool_bounds()
        assert op.ray_remote_args["num_gpus"] == 1
        assert op.ray_remote_args["num_cpus"] == resources.num_cpus
        assert op.batch_size == resources.batch_size
    assert ops["InspectStage"].ray_remote_args["accelerator_type"] == "H100"
    assert ops["DescribeStage"].compute.max_size == 3
    assert ops["EditStage"].batch_size == 6
    assert ops["EditStage"].fn_constructor_kwargs["stage2"] == cfg.stage2


def test_fused_mode_has_no_describe_pool_and_combine_adds_its_own(tmp_path, ray_cluster):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    base = [f"input.uri={tmp_path}", "stage1.engine=transformers"]
    fused = load_config(preset="paper", overrides=[*base, "stage1.mode=fused"])
    names = [_fn_name(op) for op in _map_operators(build_dataset(fused))]
    assert names[-3:] == ["FusedInspectStage", "InstructStage", "EditStage"]
    assert "DescribeStage" not in names and "InspectStage" not in names and "CombineStage" not in names

    overrides = [*base, "stage1.combine=true", "stage1.combine_resources.pool_size=2",
                 "stage1.combine_resources.batch_size=5"]  # fmt: skip
    for mode, stages in (("paper", ["InspectStage", "DescribeStage"]), ("fused", ["FusedInspectStage"])):
        cfg = load_config(preset="paper", overrides=[*overrides, f"stage1.mode={mode}"])
        ops = _map_operators(build_dataset(cfg))
        names = [_fn_name(op) for op in ops]
        assert names[-(len(stages) + 3) :] == [*stages, "InstructStage", "CombineStage", "EditStage"]
        combine = ops[names.index("CombineStage")]
        assert combine.compute.min_size == combine.compute.max_size == 2
        assert combine.batch_size == 5 and combine.ray_remote_args["num_gpus"] == 1
        assert combine.fn_constructor_kwargs["stage1"] == cfg.stage1

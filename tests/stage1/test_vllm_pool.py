"""vLLM engine arguments and pool wiring: what a call's config turns into, without starting an engine.

A real engine in a Ray Data pool (in a CPU placement group) runs in tests/test_pipeline_e2e.py; the
engine itself in tests/stage1/test_vllm_engine.py; the VLM and tensor parallelism on GPUs in tests/gpu/.
"""

from __future__ import annotations

import warnings

import pytest
from PIL import Image

from u2s.config import (
    ConfigError,
    ModelConfig,
    PlacementGroupConfig,
    Resources,
    VLLMEngineConfig,
    load_config,
)
from u2s.map_pool import map_pool
from u2s.stage1.engines import vllm_pool
from u2s.stage1.engines.vllm import engine_kwargs, executor_backend

PAPER_VLLM = VLLMEngineConfig(
    max_model_len=8192, gpu_memory_utilization=0.85, max_num_seqs=64, max_image_side=448,
    mm_processor_kwargs={"max_dynamic_patch": 1},
)  # fmt: skip
GPU_POOL = Resources(pool_size=(2, 6), batch_size=32, num_cpus=4, num_gpus=1, accelerator_type="H100")
CPU_POOL = Resources(pool_size=1, batch_size=4, num_cpus=0.25)


def _tp(n: int, **update) -> VLLMEngineConfig:
    return PAPER_VLLM.model_copy(update={"tensor_parallel_size": n, **update})


# -- engine arguments ---------------------------------------------------------------------------------


def test_engine_kwargs_carry_the_config_and_extra_kwargs_win():
    model = ModelConfig(model="org/vlm", dtype="bfloat16", revision="ab" * 20, trust_remote_code=True)
    cfg = PAPER_VLLM.model_copy(update={"engine_kwargs": {"max_num_seqs": 8, "seed": 3}})
    vision = engine_kwargs(model, cfg, vision=True)
    assert (vision["tensor_parallel_size"], vision["max_model_len"], vision["gpu_memory_utilization"]) == (
        1, 8192, 0.85)  # fmt: skip
    assert vision["enable_prefix_caching"] is True and vision["distributed_executor_backend"] == "uni"
    assert vision["limit_mm_per_prompt"] == {"image": 1} and vision["dtype"] == "bfloat16"
    assert vision["mm_processor_kwargs"] == {"max_dynamic_patch": 1}
    assert vision["revision"] == "ab" * 20 and vision["trust_remote_code"] is True
    assert vision["structured_outputs_config"] == {"backend": "xgrammar", "disable_any_whitespace": True}
    assert vision["max_num_seqs"] == 8 and vision["seed"] == 3  # engine_kwargs win
    text = engine_kwargs(model, VLLMEngineConfig(), vision=False)
    assert not {"limit_mm_per_prompt", "mm_processor_kwargs", "max_model_len"} & set(text)  # None: vLLM's


def test_workers_pick_the_executor_backend():
    assert executor_backend(VLLMEngineConfig()) == "uni"
    assert executor_backend(_tp(2)) == executor_backend(VLLMEngineConfig(pipeline_parallel_size=2)) == "ray"
    assert executor_backend(_tp(2, engine_kwargs={"distributed_executor_backend": "mp"})) == "mp"
    assert (
        engine_kwargs(ModelConfig(model="m"), _tp(4), vision=False)["distributed_executor_backend"] == "ray"
    )


# -- pools --------------------------------------------------------------------------------------------


def test_one_worker_pool_reserves_its_gpu_and_overlaps_batches():
    import ray.data

    kwargs = vllm_pool.pool_kwargs(GPU_POOL, PAPER_VLLM.model_copy(update={"max_concurrent_batches": 3}))
    compute = kwargs.pop("compute")
    assert isinstance(compute, ray.data.ActorPoolStrategy)
    assert (compute.min_size, compute.max_size) == (2, 6)
    assert compute.max_concurrent_calls_per_actor == 3 and compute.max_tasks_in_flight_per_actor == 6
    assert compute.enable_true_multi_threading  # the batches' threads share the actor's engine
    assert kwargs == {"batch_size": 32, "num_cpus": 4, "num_gpus": 1, "accelerator_type": "H100"}

    cpu = vllm_pool.pool_kwargs(CPU_POOL, VLLMEngineConfig(env_vars={"VLLM_CPU_OMP_THREADS_BIND": "all"}))
    assert (cpu["compute"].min_size, cpu["compute"].max_size) == (1, 1)
    assert "num_gpus" not in cpu and vllm_pool.REMOTE_ARGS_FN not in cpu
    assert "runtime_env" not in cpu  # the engine sets its env_vars itself: Ray's agent would log them
    mp = vllm_pool.pool_kwargs(GPU_POOL, _tp(2, engine_kwargs={"distributed_executor_backend": "mp"}))
    assert mp["num_gpus"] == 2 and vllm_pool.REMOTE_ARGS_FN not in mp  # one node: every GPU in the actor


def test_tensor_parallel_pool_gives_each_actor_its_own_placement_group(ray_cluster):
    from ray.util import placement_group_table

    kwargs = vllm_pool.pool_kwargs(GPU_POOL, _tp(2))
    assert "num_gpus" not in kwargs  # the workers hold the GPUs, in the actor's group
    assert kwargs["num_cpus"] == 4 and kwargs["accelerator_type"] == "H100"
    make = kwargs[vllm_pool.REMOTE_ARGS_FN]
    first, second = make(), make()  # what Ray Data does for each actor it starts
    groups = [args["scheduling_strategy"] for args in (first, second)]
    assert all(s.placement_group_capture_child_tasks for s in groups)  # vLLM's workers land inside
    assert groups[0].placement_group.id != groups[1].placement_group.id
    label = {"accelerator_type:H100": 0.001}
    for strategy in groups:
        table = placement_group_table(strategy.placement_group)
        assert table["strategy"] == "STRICT_PACK"  # every worker of the engine on one node
        assert list(table["bundles"].values()) == [
            {"GPU": 1.0, "CPU": 4.0, **label},
            {"GPU": 1.0, "CPU": 1.0, **label},
        ]
    assert vllm_pool.remove_placement_groups() == 2
    assert {placement_group_table(s.placement_group)["state"] for s in groups} == {"REMOVED"}
    assert vllm_pool.remove_placement_groups() == 0


def test_configured_placement_group_is_used_as_it_is_and_must_hold_the_actor():
    explicit = PlacementGroupConfig(bundles=[{"CPU": 2}], strategy="SPREAD")
    cfg = VLLMEngineConfig(placement_group_config=explicit)
    assert vllm_pool.placement_bundles(CPU_POOL, cfg) == ([{"CPU": 2.0}], "SPREAD")
    assert vllm_pool.REMOTE_ARGS_FN in vllm_pool.pool_kwargs(CPU_POOL, cfg)  # one worker, still a group
    cpu_tp = vllm_pool.placement_bundles(CPU_POOL, _tp(2))  # a CPU pool asks for no GPU bundle
    assert cpu_tp == ([{"CPU": 1.0}, {"CPU": 1.0}], "STRICT_PACK")
    with pytest.raises(ValueError, match="never start"):
        vllm_pool.pool_kwargs(GPU_POOL, cfg)  # 4 CPUs and a GPU per actor, 2 CPUs per bundle
    gpu = VLLMEngineConfig(placement_group_config=PlacementGroupConfig(bundles=[{"GPU": 1, "CPU": 4}]))
    one = vllm_pool.pool_kwargs(GPU_POOL, gpu)  # one worker in the actor: the bundle's GPU is the actor's
    assert one["num_gpus"] == 1 and vllm_pool.REMOTE_ARGS_FN in one
    with pytest.raises(ConfigError, match="placement_group_config"):
        load_config(preset="cpu-tiny", overrides=["stage1.vllm.placement_group_config={bundles: []}"])


def test_map_pool_uses_no_deprecated_api_and_no_detector_that_mints_groups(ray_cluster):
    """A per-actor group needs `ray_remote_args_fn`; Ray's high-memory detector would call it and leave a
    group per call (ray-project/ray#64012), so a dataset with such a pool runs without that detector."""
    import ray.data
    from ray.data._internal.issue_detection.detectors.high_memory_detector import HighMemoryIssueDetector
    from ray.util.annotations import RayDeprecationWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", RayDeprecationWarning)
        ds = ray.data.range(4)
        one = map_pool(ds, _Echo, vllm_pool.pool_kwargs(CPU_POOL, VLLMEngineConfig()))
        assert HighMemoryIssueDetector in one.context.issue_detectors_config.detectors
        ds = ray.data.range(4)
        tp = map_pool(ds, _Echo, vllm_pool.pool_kwargs(GPU_POOL, _tp(2)), batch_format="pyarrow")
        assert HighMemoryIssueDetector not in tp.context.issue_detectors_config.detectors
    assert HighMemoryIssueDetector in ray.data.DataContext.get_current().issue_detectors_config.detectors


class _Echo:
    def __call__(self, batch):
        return batch


# -- the plan -----------------------------------------------------------------------------------------


def _map_operators(ds) -> dict:
    """Logical map operators from source to sink, by the name of their function."""
    ops, node = {}, ds._logical_plan.dag
    while node is not None:
        if hasattr(node, "fn"):
            ops[getattr(node.fn, "__name__", type(node.fn).__name__)] = node
        deps = node.input_dependencies
        node = deps[0] if deps else None
    return ops


def test_paper_plan_on_vllm_is_one_lazy_stream_of_engine_pools(tmp_path, ray_cluster):
    """Building the plan runs nothing (no checkpoint pass, no engine, no placement group)."""
    from ray.util import placement_group_table

    from u2s.io.ids import IdKey
    from u2s.io.listing import list_input
    from u2s.pipeline import build_dataset

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    cfg = load_config(preset="paper", overrides=[
        f"input.uri={tmp_path}", f"output.uri={tmp_path}/safe", f"output.sensitive_uri={tmp_path}/sensitive",
        "stage1.vllm_llm.tensor_parallel_size=2",
        "stage2.verify.checks=[]",  # the verification pools: tests/test_pipeline_pools.py
    ])  # fmt: skip
    listing = list_input(cfg.input, cfg.storage, cfg.ray.decode, IdKey.generate())
    groups = len(placement_group_table())
    ops = _map_operators(build_dataset(cfg, listing))
    assert list(ops)[:4] == ["EditStage", "TextCallPool", "VisionCallPool", "_stateless"]
    for name in ("VisionCallPool", "TextCallPool"):
        op = ops[name]
        assert op.compute.max_concurrent_calls_per_actor == cfg.stage1.vllm.max_concurrent_batches
        assert op.fn_constructor_kwargs["pool"].engine == "vllm"
    inspect, instruct = ops["VisionCallPool"], ops["TextCallPool"]
    assert inspect.ray_remote_args["num_gpus"] == 1 and inspect.ray_remote_args_fn is None
    assert "num_gpus" not in instruct.ray_remote_args and instruct.ray_remote_args_fn is not None
    assert len(placement_group_table()) == groups  # created only when Ray Data starts an actor
    assert not (tmp_path / "sensitive").exists() and not (tmp_path / "safe").exists()

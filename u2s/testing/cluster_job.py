"""The cluster tests' job: every config key they set, and fake node types that mirror ``cluster/``.

Kept in one place so a config refactor renames keys here only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from u2s.cluster import NodeGroup

#: Pool name (as `u2s.pipeline.stage_pools` names it) → the config section holding its `Resources`.
POOL_KEYS = {
    "decode": "ray.decode",
    "inspect+describe": "stage1.calls.inspect.resources",
    "instruct": "stage1.calls.instruct.resources",
    "instruct+combine": "stage1.calls.instruct.resources",
    "edit": "stage2.resources",
}
#: Tiny model name (`u2s.testing.tiny_models.build_all`) → the config key of its path.
MODEL_KEYS = {
    "vlm": "stage1.vlm.model",
    "llm": "stage1.llm.model",
    "instruct_pix2pix": "stage2.instruct_pix2pix.model.model",
}
#: Device keys of the models a cpu-tiny job loads.
DEVICE_KEYS = ("stage1.vlm.device", "stage1.llm.device", "stage2.instruct_pix2pix.model.device")
#: Which worker group runs which pools (the groups' names in cluster/).
STAGE_GROUPS = {"gpu-stage1": ("inspect+describe", "instruct", "instruct+combine"), "gpu-stage2": ("edit",)}


def pool_overrides(pool: str, **fields: Any) -> list[str]:
    """``--set`` overrides of one pool's resources, e.g. ``pool_overrides("edit", num_gpus=1)``."""
    return [f"{POOL_KEYS[pool]}.{key}={value}" for key, value in fields.items()]


def tiny_model_overrides(models: dict[str, Path]) -> list[str]:
    """Point a cpu-tiny job at tiny models built by `build_all` (``device: auto``: CPU without CUDA)."""
    paths = [f"{key}={models[name]}" for name, key in MODEL_KEYS.items()]
    return paths + [f"{key}=auto" for key in DEVICE_KEYS]


def gpu_pool_overrides(groups: list[NodeGroup], pools: list[str], gpu_share: float = 0.25) -> list[str]:
    """Make each stage pool ask for its group's GPU and accelerator type (:data:`STAGE_GROUPS`).

    Stage-1 pools take ``gpu_share`` of a GPU each so one (fake) node holds them all; the editor takes a
    whole GPU.
    """
    by_name = {g.name: g for g in groups}
    overrides = []
    for group_name, group_pools in STAGE_GROUPS.items():
        accelerator = by_name[group_name].accelerator_type
        for pool in group_pools:
            if pool in pools:
                num_gpus = 1 if pool == "edit" else gpu_share
                overrides += pool_overrides(pool, num_gpus=num_gpus, accelerator_type=accelerator)
    return overrides


def fake_node_types(
    groups: list[NodeGroup], cpus: int = 1, max_workers: int = 1, object_store_mb: int = 200
) -> dict[str, dict[str, Any]]:
    """Ray launcher node types for the fake autoscaler, one per worker group of a cluster config: the same
    names, GPU counts, accelerator types and ``min_workers``; CPUs and ``max_workers`` scaled down to fit
    this machine."""
    types = {}
    for g in groups:
        if g.head:
            continue
        resources: dict[str, Any] = {k: int(v) for k, v in g.resources.items() if k != "CPU"}
        resources |= {"CPU": cpus, "object_store_memory": object_store_mb * 2**20}
        types[g.name] = {"resources": resources, "node_config": {}, "min_workers": g.min_workers,
                         "max_workers": max_workers}  # fmt: skip
    return types

"""Node groups of a Ray cluster config, and which group each of a job's pools can run on.

Reads the two formats in ``cluster/``: KubeRay ``RayCluster``/``RayJob`` manifests (head group and
``workerGroupSpecs``; resources from ``rayStartParams``, else the Ray container's limits, as KubeRay's
autoscaler reads them) and Ray cluster-launcher YAML (``available_node_types``). A pool fits a group when
one node of the group can hold one of the pool's actors: its CPUs, GPUs and accelerator type (Ray's
``accelerator_type:<name>`` resource). ``u2s plan --cluster`` and the consistency tests use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from u2s.config import Resources

ACCELERATOR_PREFIX = "accelerator_type:"
INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"
_SUFFIXES = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


@dataclass(frozen=True)
class NodeGroup:
    """One node type / worker group: the Ray resources each of its nodes advertises, and its size bounds."""

    name: str
    resources: dict[str, float]
    min_workers: int = 0
    max_workers: int = 0
    head: bool = False
    source: str = field(default="", compare=False)
    #: The cloud instance type its nodes are (KubeRay: the ``node.kubernetes.io/instance-type`` node
    #: selector; launcher: ``node_config.InstanceType``), if the config names one.
    instance_type: str | None = field(default=None, compare=False)

    @property
    def accelerator_type(self) -> str | None:
        """The ``accelerator_type:<name>`` resource the group advertises, if any."""
        names = [k[len(ACCELERATOR_PREFIX) :] for k in self.resources if k.startswith(ACCELERATOR_PREFIX)]
        return names[0] if names else None

    def fits(self, request: Resources) -> bool:
        """Whether one node of this group can hold one actor/task asking for ``request``."""
        have = self.resources
        if request.num_cpus > have.get("CPU", 0) or request.num_gpus > have.get("GPU", 0):
            return False
        return not request.accelerator_type or have.get(ACCELERATOR_PREFIX + request.accelerator_type, 0) > 0


def quantity(value: Any) -> float:
    """A Kubernetes resource quantity ("500m", "4", "16Gi", 2) as a number."""
    text = str(value).strip()
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * _SUFFIXES[suffix]
    return float(text)


def _ray_start_resources(value: str) -> dict[str, float]:
    """KubeRay's ``rayStartParams.resources``: a JSON object, usually quoted once more for the shell."""
    parsed: Any = value.strip()
    while isinstance(parsed, str):
        parsed = json.loads(parsed)
    return {str(k): float(v) for k, v in parsed.items()}


def _kuberay_group(name: str, group: dict[str, Any], head: bool, source: str) -> NodeGroup:
    params = group.get("rayStartParams") or {}
    containers = group["template"]["spec"]["containers"]
    limits = (containers[0].get("resources") or {}).get("limits") or {}
    resources: dict[str, float] = {}
    cpu = params.get("num-cpus", limits.get("cpu"))
    if cpu is not None:
        resources["CPU"] = quantity(cpu)
    gpu = params.get("num-gpus", limits.get("nvidia.com/gpu"))
    if gpu is not None and quantity(gpu) > 0:
        resources["GPU"] = quantity(gpu)
    if "resources" in params:
        resources.update(_ray_start_resources(params["resources"]))
    resources.update({k: quantity(v) for k, v in (group.get("resources") or {}).items()})
    instance = (group["template"]["spec"].get("nodeSelector") or {}).get(INSTANCE_TYPE_LABEL)
    if head:
        return NodeGroup(name, resources, 1, 1, head=True, source=source, instance_type=instance)
    return NodeGroup(name, resources, int(group.get("minReplicas", 0)), int(group.get("maxReplicas", 0)),
                     source=source, instance_type=instance)  # fmt: skip


def kuberay_groups(spec: dict[str, Any], source: str = "") -> list[NodeGroup]:
    """Groups of a RayCluster ``spec`` (a RayJob's ``spec.rayClusterSpec``)."""
    groups = [_kuberay_group("head", spec["headGroupSpec"], True, source)]
    for group in spec.get("workerGroupSpecs") or []:
        groups.append(_kuberay_group(group["groupName"], group, False, source))
    return groups


def launcher_groups(config: dict[str, Any], source: str = "") -> list[NodeGroup]:
    """Node types of a Ray cluster-launcher config (``available_node_types``)."""
    head = config.get("head_node_type")
    groups = []
    for name, node_type in config["available_node_types"].items():
        resources = {k: float(v) for k, v in (node_type.get("resources") or {}).items()}
        low, high = int(node_type.get("min_workers", 0)), int(node_type.get("max_workers", 0))
        if name == head:
            low = high = 1
        instance = (node_type.get("node_config") or {}).get("InstanceType")
        groups.append(NodeGroup(name, resources, low, high, head=name == head, source=source,
                                instance_type=instance))  # fmt: skip
    return groups


def load_node_groups(path: str | Path) -> list[NodeGroup]:
    """Node groups of a KubeRay manifest (RayCluster or RayJob; other documents are skipped) or a
    launcher YAML."""
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if isinstance(d, dict)]
    for doc in docs:
        if doc.get("kind") == "RayCluster":
            return kuberay_groups(doc["spec"], str(path))
        if doc.get("kind") == "RayJob":
            return kuberay_groups(doc["spec"]["rayClusterSpec"], str(path))
        if "available_node_types" in doc:
            return launcher_groups(doc, str(path))
    raise ValueError(f"{path}: no RayCluster, RayJob or cluster-launcher config found")


def launcher_max_workers(path: str | Path) -> int | None:
    """The cluster launcher's global ``max_workers``: worker nodes of all types together. None for a
    KubeRay manifest (no such cap) or a launcher config that leaves it out."""
    for doc in yaml.safe_load_all(Path(path).read_text()):
        if isinstance(doc, dict) and "available_node_types" in doc:
            value = doc.get("max_workers")
            return None if value is None else int(value)
    return None


def placement(pools: dict[str, Resources], groups: list[NodeGroup]) -> dict[str, list[str]]:
    """For each pool, the worker groups (never the head) one of its actors fits on."""
    workers = [g for g in groups if not g.head]
    return {pool: [g.name for g in workers if g.fits(request)] for pool, request in pools.items()}


def describe_request(request: Resources) -> str:
    """`num_cpus=4 num_gpus=1 accelerator_type=H100` (what a pool asks for, for messages)."""
    parts = [f"num_cpus={request.num_cpus:g}"]
    if request.num_gpus:
        parts.append(f"num_gpus={request.num_gpus:g}")
    if request.accelerator_type:
        parts.append(f"accelerator_type={request.accelerator_type}")
    return " ".join(parts)

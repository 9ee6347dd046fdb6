"""The cpu-tiny job on Ray's autoscaler: GPU pools scale up from zero on the node types of cluster/.

A head with no work CPUs and worker node types mirroring ``cluster/aws.yaml`` (a CPU group; stage-1 and
stage-2 GPU groups advertising a GPU and their accelerator type, ``min_workers: 0``) run under Ray's
fake multi-node provider. The job is submitted with ``u2s submit --wait``, its stage pools asking for
their group's GPU and accelerator type; the models still run on the CPU (``device: auto``, no CUDA).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from u2s.cluster import ACCELERATOR_PREFIX, load_node_groups
from u2s.config import load_config
from u2s.pipeline import stage_pools
from u2s.testing.cluster_job import STAGE_GROUPS, fake_node_types, gpu_pool_overrides, tiny_model_overrides
from u2s.testing.ray_cluster import RayHead

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "cluster" / "aws.yaml"
#: Ray Data names an actor-pool worker after its class: MapWorker(MapBatches(VisionCallPool)).
STAGE_CLASSES = {"inspect+describe": "VisionCallPool", "instruct": "TextCallPool",
                 "instruct+combine": "TextCallPool", "edit": "EditStage"}  # fmt: skip


def node_accelerator(node) -> str | None:
    names = [k[len(ACCELERATOR_PREFIX) :] for k in node.resources_total if k.startswith(ACCELERATOR_PREFIX)]
    return names[0] if names else None


def test_gpu_pools_scale_from_zero_on_their_node_types(tiny_models, few_images, tmp_path):
    from ray.util.state import list_actors, list_nodes

    groups = load_node_groups(LAUNCHER)
    head_group = next(g for g in groups if g.head)
    gpu_groups = {g.name: g.accelerator_type for g in groups if g.resources.get("GPU")}
    assert set(gpu_groups) == set(STAGE_GROUPS)
    pools = list(stage_pools(load_config(preset="cpu-tiny")))
    overrides = tiny_model_overrides(tiny_models) + gpu_pool_overrides(groups, pools)
    out = tmp_path / "out"

    with RayHead(
        num_cpus=int(head_group.resources["CPU"]), worker_node_types=fake_node_types(groups)
    ) as head:
        before = list_nodes(address=head.dashboard_url, detail=True)
        assert [n.is_head_node for n in before] == [True]  # every worker group starts at zero
        cmd = [sys.executable, "-m", "u2s.cli", "submit", "--address", head.dashboard_url, "--wait",
               "--working-dir", str(REPO), "--preset", "cpu-tiny", "--input", str(few_images),
               "--output", str(out / "safe"), "--sensitive-output", str(out / "sensitive")]  # fmt: skip
        for item in overrides:
            cmd += ["--set", item]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert re.search(r"job raysubmit_\w+: SUCCEEDED", result.stdout)
        nodes = {n.node_id: n for n in list_nodes(address=head.dashboard_url, detail=True)}
        actors = list_actors(address=head.dashboard_url, detail=True, limit=1000)
        launched = head.autoscaler_log()

    # The autoscaler launched a node of each GPU type (its launcher's log line, and the event it sends to
    # the driver), and that node advertises the type's accelerator.
    for name, accelerator in gpu_groups.items():
        assert re.search(rf"Launching \d+ nodes, type {re.escape(name)}\.", launched), name
        assert re.search(rf"Adding \d+ node\(s\) of type {re.escape(name)}\.", result.stdout), name
        assert any(node_accelerator(n) == accelerator for n in nodes.values()), name
    # Each stage's actors ran on nodes of its group's type; the driver on the head.
    for group, group_pools in STAGE_GROUPS.items():
        for pool in group_pools:
            if pool not in pools:
                continue
            ran = [a for a in actors if a.class_name == f"MapWorker(MapBatches({STAGE_CLASSES[pool]}))"]
            assert ran, pool
            assert {node_accelerator(nodes[a.node_id]) for a in ran} == {gpu_groups[group]}, pool
    supervisors = [a for a in actors if a.class_name == "JobSupervisor"]
    assert supervisors and all(nodes[a.node_id].is_head_node for a in supervisors)

    # Every input appears exactly once.
    files = sorted(p.name for p in few_images.iterdir())
    rows = pq.read_table(out / "sensitive").to_pylist()  # the safe table publishes no paths
    assert sorted(Path(r["source"]).name for r in rows) == files
    assert len({r["id"] for r in rows}) == len(files)
    assert {r["status"] for r in rows} <= {"kept", "edited", "error"}

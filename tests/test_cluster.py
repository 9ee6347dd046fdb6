"""u2s.cluster: node groups read from both config formats, and which pool fits which group."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from u2s.cluster import NodeGroup, kuberay_groups, load_node_groups, quantity
from u2s.config import Resources

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("text", "value"), [("500m", 0.5), ("16", 16), (4, 4), ("1Gi", 2**30), ("2k", 2000)])
def test_quantity(text, value):
    assert quantity(text) == value


def test_kuberay_resources_come_from_ray_start_params_else_container_limits():
    spec = yaml.safe_load(
        """
        headGroupSpec:
          rayStartParams: {num-cpus: "0"}
          template: {spec: {containers: [{name: ray-head, resources: {limits: {cpu: "8"}}}]}}
        workerGroupSpecs:
          - groupName: a
            minReplicas: 0
            maxReplicas: 3
            rayStartParams: {num-gpus: "2", resources: '"{\\"accelerator_type:L4\\": 1, \\"disk\\": 5}"'}
            template: {spec: {containers: [{name: w, resources: {limits: {cpu: 6500m, nvidia.com/gpu: 2}}}]}}
          - groupName: b
            minReplicas: 1
            maxReplicas: 1
            template: {spec: {containers: [{name: w, resources: {limits: {cpu: "4", nvidia.com/gpu: 1}}}]}}
        """
    )
    head, a, b = kuberay_groups(spec)
    assert head.head and head.resources == {"CPU": 0}
    assert a == NodeGroup("a", {"CPU": 6.5, "GPU": 2, "accelerator_type:L4": 1, "disk": 5}, 0, 3)
    assert a.accelerator_type == "L4"
    assert b.resources == {"CPU": 4, "GPU": 1} and b.accelerator_type is None


@pytest.mark.parametrize(
    ("request_", "fits"),
    [
        (Resources(num_cpus=4, num_gpus=1, accelerator_type="H100"), True),
        (Resources(num_cpus=4, num_gpus=1), True),
        (Resources(num_cpus=4, num_gpus=1, accelerator_type="L40S"), False),
        (Resources(num_cpus=4, num_gpus=2, accelerator_type="H100"), False),
        (Resources(num_cpus=17, num_gpus=1), False),
        (Resources(num_cpus=0.25, num_gpus=0.25, accelerator_type="H100"), True),
    ],
)
def test_fits_checks_cpus_gpus_and_accelerator(request_, fits):
    (stage1,) = [g for g in load_node_groups(REPO / "cluster" / "aws.yaml") if g.name == "gpu-stage1"]
    assert stage1.fits(request_) is fits


def test_load_node_groups_rejects_other_yaml(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("apiVersion: v1\nkind: ConfigMap\n")
    with pytest.raises(ValueError, match="no RayCluster"):
        load_node_groups(path)

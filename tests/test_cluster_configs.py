"""cluster/: the KubeRay manifests against the KubeRay CRDs, the launcher YAML against Ray's own schema,
and every preset's pools against every config's worker groups."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import replace
from pathlib import Path

import jsonschema
import pytest
import yaml

from u2s.cluster import (
    ACCELERATOR_PREFIX,
    INSTANCE_TYPE_LABEL,
    NodeGroup,
    load_node_groups,
    placement,
    quantity,
)
from u2s.config import PRESETS, load_config
from u2s.instances import INSTANCE_TYPES, InstanceType, ephemeral_room, instance_type
from u2s.pipeline import stage_pools
from u2s.submit import IMAGE_APP_DIR, JOB_SCRIPT
from u2s.testing.cluster_job import STAGE_GROUPS, pool_overrides

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
RAYCLUSTER, RAYJOB, LAUNCHER = (
    CLUSTER / "kuberay/raycluster.yaml",
    CLUSTER / "kuberay/rayjob.yaml",
    CLUSTER / "aws.yaml",
)
CONFIGS = [RAYCLUSTER, RAYJOB, LAUNCHER]
CRD_DIRS = [REPO / "shared/reference/kuberay", REPO.parent / "shared/reference/kuberay"]


# -- KubeRay -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crds() -> dict[str, dict]:
    """The v1 openAPIV3Schema of each KubeRay CRD, by kind."""
    found = next((d for d in CRD_DIRS if d.is_dir()), None)
    if found is None:
        pytest.skip(f"KubeRay CRDs not found in {' or '.join(str(d) for d in CRD_DIRS)}")
    schemas = {}
    for name in ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml"):
        crd = yaml.safe_load((found / name).read_text())
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schemas[crd["spec"]["names"]["kind"]] = v1["schema"]["openAPIV3Schema"]
    return schemas


def undeclared(node, schema: dict, path: str = "") -> list[str]:
    """Keys the structural schema does not declare (the API server would prune them silently).

    Under ``x-kubernetes-preserve-unknown-fields`` anything goes; a map (``additionalProperties`` schema)
    checks its values against that schema."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(node, dict):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        for key, value in node.items():
            where = f"{path}.{key}" if path else key
            if props is not None and key in props:
                found += undeclared(value, props[key], where)
            elif isinstance(extra, dict):
                found += undeclared(value, extra, where)
            elif extra is not True:
                found.append(where)
    elif isinstance(node, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(node):
            found += undeclared(item, schema["items"], f"{path}[{i}]")
    return found


def kuberay_docs(path: Path) -> list[dict]:
    return [
        d for d in yaml.safe_load_all(path.read_text()) if d and d.get("apiVersion", "").startswith("ray.io/")
    ]


def check_manifest(doc: dict, crds: dict[str, dict]) -> list[str]:
    """Schema errors and undeclared keys of one RayCluster/RayJob (root ``metadata`` is ObjectMeta)."""
    schema = crds[doc["kind"]]
    problems = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
    body = {k: v for k, v in doc.items() if k != "metadata"}
    return problems + [f"undeclared: {key}" for key in undeclared(body, schema)]


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_kuberay_manifest_matches_its_crd(path, crds):
    docs = kuberay_docs(path)
    assert [d["kind"] for d in docs] == (["RayCluster"] if path == RAYCLUSTER else ["RayJob"])
    for doc in docs:
        assert check_manifest(doc, crds) == []


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda s: s["workerGroupSpecs"][1].update(minReplica=0),
         "undeclared: spec.workerGroupSpecs[1].minReplica"),
        (lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0].update(imagePullPolicyy="Always"),
         "undeclared: spec.headGroupSpec.template.spec.containers[0].imagePullPolicyy"),
        (lambda s: s.update(enableInTreeAutoscale=True), "undeclared: spec.enableInTreeAutoscale"),
        (lambda s: s["workerGroupSpecs"][2].update(minReplicas="zero"), "'zero' is not of type 'integer'"),
    ],
    ids=["misspelt-group-field", "misspelt-pod-field", "misspelt-spec-field", "wrong-type"],
)  # fmt: skip
def test_kuberay_check_fails_on_a_misspelt_or_mistyped_field(crds, edit, expected):
    doc = copy.deepcopy(kuberay_docs(RAYCLUSTER)[0])
    edit(doc["spec"])
    assert expected in check_manifest(doc, crds)


def test_rayjob_brings_its_cluster_up_and_down_and_runs_the_image_entrypoint():
    config_map, job = yaml.safe_load_all(RAYJOB.read_text())
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert (
        spec["rayClusterSpec"]["workerGroupSpecs"]
        == yaml.safe_load(RAYCLUSTER.read_text())["spec"]["workerGroupSpecs"]
    )
    words = spec["entrypoint"].split()
    assert words[:2] == ["python", f"{IMAGE_APP_DIR}/{JOB_SCRIPT}"]
    assert (REPO / JOB_SCRIPT).is_file()
    assert "entrypointNumGpus" not in spec  # the driver asks for no GPU
    # --config names the ConfigMap's file, mounted on the head (where the driver runs).
    config_path = Path(words[words.index("--config") + 1])
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (mount,) = [m for m in head["containers"][0]["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
    (volume,) = [v for v in head["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert config_path.name in config_map["data"]


def test_rayjob_config_validates_and_pins_each_stage_to_its_group(tmp_path):
    config_map, job = yaml.safe_load_all(RAYJOB.read_text())
    words = job["spec"]["entrypoint"].split()
    preset = words[words.index("--preset") + 1]
    path = tmp_path / "job.yaml"
    path.write_text(config_map["data"]["job.yaml"])
    cfg = load_config(preset=preset, path=path)
    fits = placement(stage_pools(cfg), load_node_groups(RAYJOB))
    for group, pools in STAGE_GROUPS.items():
        for pool in pools:
            if pool in fits:
                assert fits[pool] == [group], pool


# -- Ray's cluster launcher ----------------------------------------------------------------------------


def launcher_errors(config: dict) -> list[str]:
    """Ray's own schema (ray/autoscaler/ray-schema.json), then `ray up`'s own fill-in and validation."""
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(config)]
    if not errors:
        try:
            validate_config(prepare_config(copy.deepcopy(config)))
        except (jsonschema.ValidationError, ValueError, RuntimeError) as e:
            errors.append(str(e))
    return errors


def _enum_errors(value, shape, path: str) -> list[str]:
    """Values outside an enum of botocore's model (its ParamValidator checks types, not enum members)."""
    if shape.type_name == "structure" and isinstance(value, dict):
        return [e for k, v in value.items() if k in shape.members
                for e in _enum_errors(v, shape.members[k], f"{path}.{k}")]  # fmt: skip
    if shape.type_name == "list" and isinstance(value, list):
        return [e for i, v in enumerate(value) for e in _enum_errors(v, shape.member, f"{path}[{i}]")]
    enum = getattr(shape, "enum", None)
    return [f"{path}: {value!r} is not one of {enum}"] if enum and value not in enum else []


def ec2_errors(config: dict) -> list[str]:
    """``node_config`` goes to EC2 RunInstances: each key must be one of its parameters, and the values
    must pass botocore's own parameter validation (types, nesting, enums) for that call."""
    import botocore.session
    from botocore.validate import ParamValidator

    operation = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances")
    shape = operation.input_shape
    errors = []
    for name, node_type in config["available_node_types"].items():
        node_config = node_type["node_config"]
        unknown = [f"{name}.{key}" for key in node_config if key not in shape.members]
        errors += unknown
        if unknown:
            continue
        params = {"MinCount": 1, "MaxCount": 1, **node_config}  # what Ray's AWS node provider adds
        report = ParamValidator().validate(params, shape)
        if report.has_errors():
            errors.append(f"{name}: {report.generate_report()}")
        errors += _enum_errors(node_config, shape, name)
    return errors


def test_launcher_config_matches_rays_schema():
    config = yaml.safe_load(LAUNCHER.read_text())
    assert launcher_errors(config) == []
    assert ec2_errors(config) == []


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda c: c.update(idle_timeout_minute=5), "idle_timeout_minute"),
        (lambda c: c["available_node_types"]["gpu-stage2"].update(min_worker=0), "min_worker"),
        (lambda c: c["available_node_types"]["cpu"]["resources"].update(CPU="16"), "'16' is not of type"),
    ],
    ids=["misspelt-top-level", "misspelt-node-type-field", "wrong-type"],
)
def test_launcher_check_fails_on_a_misspelt_or_mistyped_field(edit, expected):
    config = yaml.safe_load(LAUNCHER.read_text())
    edit(config)
    assert any(expected in error for error in launcher_errors(config))


def test_launcher_check_fails_on_a_misspelt_instance_field():
    config = yaml.safe_load(LAUNCHER.read_text())
    config["available_node_types"]["gpu-stage1"]["node_config"]["InstanceTyp"] = "p5.4xlarge"
    assert ec2_errors(config) == ["gpu-stage1.InstanceTyp"]


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda n: n["cpu"]["node_config"].update(InstanceMarketOptions={"MarketType": "spott"}),
         "cpu.InstanceMarketOptions.MarketType: 'spott' is not one of"),
        (lambda n: n["gpu-stage2"]["node_config"].update(InstanceMarketOptions={"Spot": True}),
         'Unknown parameter in InstanceMarketOptions: "Spot"'),
        (lambda n: n["head"]["node_config"].update(IamInstanceProfile="u2s-head"),
         "Invalid type for parameter IamInstanceProfile"),
    ],
    ids=["bad-enum-value", "misspelt-nested-key", "wrong-type"],
)  # fmt: skip
def test_launcher_check_fails_on_a_bad_run_instances_value(edit, expected):
    config = yaml.safe_load(LAUNCHER.read_text())
    edit(config["available_node_types"])
    assert any(expected in error for error in ec2_errors(config)), ec2_errors(config)


# -- Groups and pools ----------------------------------------------------------------------------------


def _shape(groups: list[NodeGroup]) -> dict[str, tuple]:
    return {g.name: (g.head, g.resources, g.min_workers, g.max_workers) for g in groups}


def test_configs_declare_the_same_groups():
    kuberay = _shape(load_node_groups(RAYCLUSTER))
    assert _shape(load_node_groups(RAYJOB)) == kuberay
    assert _shape(load_node_groups(LAUNCHER)) == kuberay


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_gpu_groups_scale_up_from_zero_and_the_head_runs_no_work(path):
    groups = load_node_groups(path)
    (head,) = [g for g in groups if g.head]
    assert head.resources.get("CPU") == 0 and not head.resources.get("GPU")
    gpu_groups = [g for g in groups if g.resources.get("GPU")]
    assert {g.name for g in gpu_groups} == set(STAGE_GROUPS)
    for g in gpu_groups:  # what a node would bring is known before any node exists
        assert g.min_workers == 0 and g.max_workers >= 1 and g.accelerator_type
    assert len({g.accelerator_type for g in gpu_groups}) == len(gpu_groups)


def test_autoscaling_is_on():
    for path in (RAYCLUSTER, RAYJOB):
        doc = kuberay_docs(path)[0]
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        assert spec["enableInTreeAutoscaling"] is True
        assert all(g["replicas"] == 0 for g in spec["workerGroupSpecs"])
    launcher = yaml.safe_load(LAUNCHER.read_text())
    assert launcher["idle_timeout_minutes"] > 0


def _images(node) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "image" and isinstance(v, str)] + [
            i for v in node.values() for i in _images(v)
        ]
    return [i for v in node for i in _images(v)] if isinstance(node, list) else []


def pyproject_pins() -> tuple[str, str]:
    """(u2s version, the `gpu` extra's ray pin) from pyproject.toml."""
    text = (REPO / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', text, re.MULTILINE).group(1)
    gpu = re.search(r"^gpu = \[(.*?)^\]", text, re.MULTILINE | re.DOTALL).group(1)
    return version, re.search(r'"ray\[[^\]]*\]==([^"]+)"', gpu).group(1)


def test_every_node_runs_the_u2s_image_of_this_version():
    version, ray_pin = pyproject_pins()
    images = [
        i for path in CONFIGS for doc in yaml.safe_load_all(path.read_text()) if doc for i in _images(doc)
    ]
    assert len(images) >= 7
    assert {i.rsplit("/", 1)[-1] for i in images} == {f"u2s:{version}"}
    for path in (RAYCLUSTER, RAYJOB):
        doc = kuberay_docs(path)[0]
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        assert spec["rayVersion"] == ray_pin


def test_no_credentials_in_cluster_configs():
    """Credentials reach pods by ServiceAccount (IRSA) or a Secret reference, never as values."""
    secret_name = re.compile(r"(SECRET|TOKEN|PASSWORD|ACCESS_KEY)", re.IGNORECASE)
    for path in CONFIGS:
        text = path.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}", text)
        for doc in yaml.safe_load_all(text):
            envs = [e for e in _walk_env(doc)]
            assert not [e["name"] for e in envs if secret_name.search(e["name"]) and "value" in e], path


def _walk_env(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list):
                yield from value
            else:
                yield from _walk_env(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk_env(item)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_preset_pool_fits_a_worker_group(preset, path):
    cfg = load_config(preset=preset, overrides=["input.uri=s3://b/in"])
    fits = placement(stage_pools(cfg), load_node_groups(path))
    assert all(fits.values()), {pool: groups for pool, groups in fits.items() if not groups}


@pytest.mark.parametrize(
    "request_",
    [{"accelerator_type": "B200"}, {"num_gpus": 2}, {"num_cpus": 64}],
    ids=["unknown-accelerator", "two-gpus", "too-many-cpus"],
)
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_a_pool_asking_for_what_no_group_has_fits_none(path, request_):
    cfg = load_config(preset="paper", overrides=pool_overrides("edit", **request_))
    fits = placement(stage_pools(cfg), load_node_groups(path))
    assert fits["edit"] == []
    assert fits["inspect+describe"]  # the other pools are untouched


# -- Node sizing, scheduling and operations (EKS) ------------------------------------------------------

EKS, IAM = CLUSTER / "eks", CLUSTER / "iam"
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}
CACHE_DIR = "/home/ray/.cache"


def cluster_spec(path: Path) -> dict:
    doc = kuberay_docs(path)[0]
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def pod_groups(spec: dict) -> list[tuple[str, dict, bool]]:
    """(group name, group spec, is head) of a RayCluster spec, head first."""
    return [("head", spec["headGroupSpec"], True)] + [
        (g["groupName"], g, False) for g in spec["workerGroupSpecs"]
    ]


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay: the Ray container comes first


def pod_requests(spec: dict, group: dict, head: bool) -> dict[str, float]:
    """What the scheduler adds up for one pod: every container's requests, the head's autoscaler sidecar
    (KubeRay injects it with autoscalerOptions.resources) included."""
    containers = [c.get("resources") or {} for c in group["template"]["spec"]["containers"]]
    if head and spec.get("enableInTreeAutoscaling"):
        containers.append(spec["autoscalerOptions"]["resources"])
    total: dict[str, float] = {}
    for resources in containers:
        for name, value in (resources.get("requests") or {}).items():
            total[name] = total.get(name, 0.0) + quantity(value)
    return total


def node_type_of(group: dict) -> InstanceType:
    return instance_type(group["template"]["spec"]["nodeSelector"][INSTANCE_TYPE_LABEL])


def fit_problems(spec: dict, instance_table=None) -> list[str]:
    """Groups whose pod asks for more than its node type leaves a pod (u2s/instances.py's pod room)."""
    problems = []
    for name, group, head in pod_groups(spec):
        node = node_type_of(group) if instance_table is None else instance_table(node_type_of(group))
        cpu, memory_gib = node.pod_room()
        asked = pod_requests(spec, group, head)
        if asked.get("cpu", 0) > cpu:
            problems.append(f"{name}: cpu {asked['cpu']:g} > {cpu:.2f} on {node.name}")
        if asked.get("memory", 0) / 2**30 > memory_gib:
            problems.append(
                f"{name}: memory {asked['memory'] / 2**30:g}Gi > {memory_gib:.2f}Gi on {node.name}"
            )
        if asked.get("nvidia.com/gpu", 0) > node.gpus:
            problems.append(f"{name}: {asked['nvidia.com/gpu']:g} GPUs > {node.gpus} on {node.name}")
    return problems


def test_pod_room_follows_published_eks_reservations():
    """Hand-checked figures: an m5.large (2 vCPU, 29 pods) reserves 70m CPU and 574 MiB; 110 pods reserve
    1465 MiB (255 + 11 x 110); a 16-vCPU node 110m (60 + 10 + 2 x 5 + 12 x 2.5)."""
    m5_large = InstanceType("m5.large", 2, 8, 0.096, max_pods=29)
    assert m5_large.kube_reserved_cpu() == pytest.approx(0.070)
    assert m5_large.kube_reserved_memory_gib() * 1024 == pytest.approx(574)
    assert replace(m5_large, max_pods=110).kube_reserved_memory_gib() * 1024 == pytest.approx(1465)
    assert instance_type("m6i.4xlarge").kube_reserved_cpu() == pytest.approx(0.110)
    # What a pod may ask for is below nominal by more than the reservations (capacity, DaemonSets).
    for node in INSTANCE_TYPES.values():
        cpu, memory = node.pod_room()
        assert cpu < node.vcpus - node.kube_reserved_cpu()
        assert memory < node.memory_gib - node.kube_reserved_memory_gib()
    # GPU nodes run more agents (device plugin, DCGM exporter) than a CPU node of the same size.
    assert instance_type("g6e.4xlarge").pod_room()[0] < instance_type("m6i.4xlarge").pod_room()[0]
    with pytest.raises(ValueError, match="known: "):
        instance_type("m6i.4xlargee")


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_every_pod_fits_the_room_its_node_type_leaves(path):
    spec = cluster_spec(path)
    assert fit_problems(spec) == []
    # ...also where kubelet reserves for the VPC CNI's higher pod limits (prefix delegation: 110 pods on
    # these sizes), whatever the node's max pods turns out to be.
    assert fit_problems(spec, lambda node: replace(node, max_pods=max(node.max_pods, 110))) == []


@pytest.mark.parametrize(
    ("group", "requests"),
    [("cpu", {"cpu": "16", "memory": "64Gi"}),           # the whole m6i.4xlarge
     ("gpu-stage2", {"cpu": "7", "memory": "64Gi", "nvidia.com/gpu": "1"}),
     ("gpu-stage1", {"cpu": "16", "memory": "200Gi", "nvidia.com/gpu": "1"}),
     ("gpu-stage2", {"cpu": "7", "memory": "54Gi", "nvidia.com/gpu": "2"})],
    ids=["whole-cpu-node", "whole-memory", "every-vcpu", "two-gpus"],
)  # fmt: skip
def test_the_fit_check_fails_for_a_pod_asking_for_the_whole_node(group, requests):
    spec = copy.deepcopy(cluster_spec(RAYCLUSTER))
    (target,) = [g for name, g, _ in pod_groups(spec) if name == group]
    ray_container(target)["resources"]["requests"] = requests
    problems = fit_problems(spec)
    assert problems and all(p.startswith(f"{group}: ") for p in problems), problems


def test_the_fit_check_counts_the_heads_autoscaler_sidecar():
    spec = copy.deepcopy(cluster_spec(RAYCLUSTER))
    spec["autoscalerOptions"]["resources"]["requests"] = {"cpu": "2", "memory": "4Gi"}
    assert {p.split(":")[0] for p in fit_problems(spec)} == {"head"}  # 6 + 2 CPU, 26 + 4 GiB


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_requests_and_limits_follow_the_kubernetes_conventions(path):
    """CPU: a request and no limit (no CFS throttling of Ray's workers); memory and GPUs: limit = request;
    ephemeral-storage requested (logs, spilled objects), so the scheduler counts the disk."""
    spec = cluster_spec(path)
    sidecar = spec["autoscalerOptions"]["resources"]
    assert "cpu" not in sidecar.get("limits", {})
    for name, group, _ in pod_groups(spec):
        for container in group["template"]["spec"]["containers"]:
            requests, limits = container["resources"]["requests"], container["resources"].get("limits", {})
            assert "cpu" not in limits and quantity(requests["cpu"]) > 0, name
            assert quantity(limits["memory"]) == quantity(requests["memory"]), name
            assert quantity(limits.get("nvidia.com/gpu", 0)) == quantity(requests.get("nvidia.com/gpu", 0))
            assert quantity(requests["ephemeral-storage"]) >= 10 * 2**30, name


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_ray_start_params_equal_the_pod_requests(path):
    """Ray advertises what the pod was given: num-cpus = the CPU request (0 on the head, which runs no
    work), memory = the memory request in bytes, num-gpus = the GPUs; the object store fits its /dev/shm."""
    for name, group, head in pod_groups(cluster_spec(path)):
        params, requests = group["rayStartParams"], ray_container(group)["resources"]["requests"]
        for key in ("num-cpus", "memory", "object-store-memory"):
            assert re.fullmatch(r"\d+", params[key]), (name, key)  # integers, as Ray and KubeRay parse them
        assert int(params["num-cpus"]) == (0 if head else quantity(requests["cpu"])), name
        assert int(params["memory"]) == quantity(requests["memory"]), name
        assert quantity(params.get("num-gpus", 0)) == quantity(requests.get("nvidia.com/gpu", 0)), name
        (shm,) = [v for v in group["template"]["spec"]["volumes"] if v["name"] == "shm"]
        assert shm["emptyDir"]["medium"] == "Memory"
        assert (
            int(params["object-store-memory"])
            < quantity(shm["emptyDir"]["sizeLimit"])
            < int(params["memory"])
        )
        mounts = {m["mountPath"]: m["name"] for m in ray_container(group)["volumeMounts"]}
        assert mounts["/dev/shm"] == "shm", name


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_groups_select_nodes_by_a_label_known_before_the_node_boots(path):
    """`node.kubernetes.io/instance-type` is known to Karpenter and Cluster Autoscaler before a node exists
    (GPU feature discovery's `nvidia.com/gpu.product` is not: such a group never scales from zero). GPU
    pods tolerate the GPU taint; the instance type has the GPU the group advertises to Ray."""
    assert "nvidia.com/gpu.product" not in path.read_text()
    for name, group, _ in pod_groups(cluster_spec(path)):
        pod = group["template"]["spec"]
        assert set(pod["nodeSelector"]) == {INSTANCE_TYPE_LABEL}, name
        assert "affinity" not in pod, name
        node = node_type_of(group)
        tolerations = [
            (t.get("key"), t.get("operator", "Equal"), t.get("effect")) for t in pod.get("tolerations", [])
        ]
        tolerates = (GPU_TAINT["key"], "Exists", "NoSchedule") in tolerations
        gpus = quantity(ray_container(group)["resources"]["requests"].get("nvidia.com/gpu", 0))
        assert tolerates == bool(gpus) == bool(node.gpus), name
        if gpus:
            assert gpus == node.gpus
            assert ACCELERATOR_PREFIX + node.gpu in group["rayStartParams"]["resources"], name


def test_every_config_runs_each_group_on_the_same_instance_type():
    types = [{g.name: g.instance_type for g in load_node_groups(path)} for path in CONFIGS]
    assert types[0] == types[1] == types[2]
    assert all(name in INSTANCE_TYPES for name in types[0].values())


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_rays_own_translation_gives_every_group_its_intended_resources(path):
    """KubeRay's autoscaler turns the RayCluster into an autoscaling config with Ray's own code; what it
    plans with per node must be the pod's requests and the instance type's GPU."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    spec = cluster_spec(path)
    config = _derive_autoscaling_config_from_ray_cr(
        {"metadata": {"name": "u2s", "namespace": "default"}, "spec": copy.deepcopy(spec)}
    )
    node_types = config["available_node_types"]
    assert set(node_types) == {"headgroup"} | {g["groupName"] for g in spec["workerGroupSpecs"]}
    for name, group, head in pod_groups(spec):
        requests, node = ray_container(group)["resources"]["requests"], node_type_of(group)
        expected = {"CPU": 0 if head else quantity(requests["cpu"]), "memory": quantity(requests["memory"])}
        if node.gpus:
            expected |= {"GPU": node.gpus, f"{ACCELERATOR_PREFIX}{node.gpu}": 1}
        translated = node_types["headgroup" if head else name]
        assert translated["resources"] == expected, name
        if not head:
            assert (translated["min_workers"], translated["max_workers"]) == (0, group["maxReplicas"])
    assert config["max_workers"] == sum(g["maxReplicas"] for g in spec["workerGroupSpecs"])
    assert config["idle_timeout_minutes"] == spec["autoscalerOptions"]["idleTimeoutSeconds"] / 60


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_gpu_pods_share_one_model_cache_per_cluster(path):
    (claim,) = [d for d in yaml.safe_load_all((EKS / "model-cache.yaml").read_text())
                if d["kind"] == "PersistentVolumeClaim"]  # fmt: skip
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for name, group, _ in pod_groups(cluster_spec(path)):
        if not node_type_of(group).gpus:
            continue
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        (mount,) = [m for m in ray_container(group)["volumeMounts"] if m["mountPath"] == CACHE_DIR]
        assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        env = {e["name"]: e["value"] for e in ray_container(group)["env"]}
        assert env["HF_HOME"] == f"{CACHE_DIR}/huggingface", name
        assert env["VLLM_CACHE_ROOT"] == f"{CACHE_DIR}/vllm", name
        assert env["U2S_MODEL_CACHE"] == f"{CACHE_DIR}/u2s-models", name


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_every_pod_exports_metrics_and_the_head_finds_grafana(path):
    monitors = list(yaml.safe_load_all((EKS / "podmonitor.yaml").read_text()))
    assert {m["kind"] for m in monitors} == {"PodMonitor"}
    scraped = {(frozenset(m["spec"]["selector"]["matchLabels"].items()), e["port"])
               for m in monitors for e in m["spec"]["podMetricsEndpoints"]}  # fmt: skip
    for name, group, head in pod_groups(cluster_spec(path)):
        ports = {p["name"]: p["containerPort"] for p in ray_container(group)["ports"]}
        assert ports["metrics"] == 8080, name
        labels = {"ray.io/is-ray-node": "yes", "ray.io/node-type": "head" if head else "worker"}
        for selector, port in scraped:  # every scraped port exists on every pod the monitor selects
            if selector <= set(labels.items()):
                assert port in ports, (name, port)
    head = cluster_spec(path)["headGroupSpec"]
    env = {e["name"]: e["value"] for e in ray_container(head)["env"]}
    assert {"RAY_GRAFANA_HOST", "RAY_PROMETHEUS_HOST", "RAY_GRAFANA_IFRAME_HOST"} <= set(env)
    assert all(env[k].startswith("http") for k in env if k.startswith("RAY_"))


def test_the_rayjob_retries_failed_attempts_and_each_resumes():
    _, job = yaml.safe_load_all(RAYJOB.read_text())
    spec = job["spec"]
    assert "--resume" in spec["entrypoint"].split() and "--force" not in spec["entrypoint"].split()
    assert spec["backoffLimit"] >= 2
    # The finished cluster (GPU nodes included) is deleted within the autoscaler's idle timeout.
    assert (
        0
        < spec["ttlSecondsAfterFinished"]
        <= spec["rayClusterSpec"]["autoscalerOptions"]["idleTimeoutSeconds"]
    )
    assert spec["activeDeadlineSeconds"] >= 7 * 24 * 3600  # a week-long run is not cut short


def test_resume_on_empty_outputs_is_a_fresh_run(tmp_path):
    """Why the RayJob can always pass --resume: with no earlier attempt there is nothing to resume."""
    from u2s.config import OutputConfig, StorageConfig
    from u2s.io.writers import prepare_outputs

    output = OutputConfig(uri=str(tmp_path / "safe"), sensitive_uri=str(tmp_path / "sensitive"))
    assert prepare_outputs(output, StorageConfig(), resume=True) is False
    assert (tmp_path / "safe").is_dir() and (tmp_path / "sensitive").is_dir()
    (tmp_path / "safe" / "part-0.parquet").write_bytes(b"x")
    assert prepare_outputs(output, StorageConfig(), resume=True) is True  # an earlier attempt's files


# -- cluster/eks ---------------------------------------------------------------------------------------


def eks_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((EKS / name).read_text()) if d]


def test_eks_examples_parse_with_the_expected_kinds():
    kinds = {path.name: sorted({d["kind"] for d in eks_docs(path.name)}) for path in EKS.glob("*.yaml")}
    assert kinds == {
        "karpenter.yaml": ["EC2NodeClass", "NodePool"],
        "eksctl-nodegroups.yaml": ["ClusterConfig"],
        "model-cache.yaml": ["PersistentVolumeClaim", "StorageClass"],
        "podmonitor.yaml": ["PodMonitor"],
    }
    (claim,) = [d for d in eks_docs("model-cache.yaml") if d["kind"] == "PersistentVolumeClaim"]
    classes = {d["metadata"]["name"] for d in eks_docs("model-cache.yaml") if d["kind"] == "StorageClass"}
    assert claim["spec"]["storageClassName"] in classes


def kuberay_node_groups() -> dict[str, dict]:
    """Group name -> what its nodes must offer: instance type, GPU taint, max nodes, disk, spot allowed."""
    spec = cluster_spec(RAYCLUSTER)
    return {
        name: {
            "type": node_type_of(group).name,
            "gpu": bool(node_type_of(group).gpus),
            "max": 1 if head else group["maxReplicas"],
            "disk": pod_requests(spec, group, head)["ephemeral-storage"] / 2**30,
            "spot": name in SPOT_GROUPS,
        }
        for name, group, head in pod_groups(spec)
    }


SPOT_GROUPS = {"cpu", "gpu-stage2"}  # never the head; stage 1's vLLM engines stay on-demand


def karpenter_problems(docs: list[dict]) -> list[str]:
    """What keeps a kuberay group from getting its nodes out of these NodePools / EC2NodeClasses."""
    pools = [d for d in docs if d["kind"] == "NodePool"]
    classes = {d["metadata"]["name"]: d for d in docs if d["kind"] == "EC2NodeClass"}
    problems = [
        f"{d['metadata']['name']}: {d['apiVersion']}" for d in pools if d["apiVersion"] != "karpenter.sh/v1"
    ]
    for name, want in kuberay_node_groups().items():
        serving = []
        for pool in pools:
            requirements = {r["key"]: r for r in pool["spec"]["template"]["spec"]["requirements"]}
            types = requirements[INSTANCE_TYPE_LABEL]
            if types["operator"] == "In" and want["type"] in types["values"]:
                serving.append((pool, requirements))
        if len(serving) != 1:  # exactly one pool may launch the group's node
            problems.append(f"{name}: {len(serving)} NodePools offer {want['type']}")
            continue
        ((pool, requirements),) = serving
        template, spec = pool["spec"]["template"]["spec"], pool["spec"]
        if template.get("taints", []) != ([GPU_TAINT] if want["gpu"] else []):
            problems.append(f"{name}: taints {template.get('taints')}")
        capacity = set(requirements["karpenter.sh/capacity-type"]["values"])
        if capacity != ({"spot", "on-demand"} if want["spot"] else {"on-demand"}):
            problems.append(f"{name}: capacity types {sorted(capacity)}")
        if spec["disruption"]["consolidationPolicy"] != "WhenEmpty":  # never evicts a running Ray pod
            problems.append(f"{name}: consolidates nodes that are not empty")
        (root,) = classes[template["nodeClassRef"]["name"]]["spec"]["blockDeviceMappings"]
        if want["disk"] > ephemeral_room(quantity(root["ebs"]["volumeSize"]) / 2**30):
            problems.append(f"{name}: root volume {root['ebs']['volumeSize']} too small")
        if want["gpu"] and quantity(spec.get("limits", {}).get("nvidia.com/gpu", 0)) < want["max"]:
            problems.append(f"{name}: the pool's GPU limit is below maxReplicas")
    return problems


def test_karpenter_node_pools_serve_every_group():
    assert karpenter_problems(eks_docs("karpenter.yaml")) == []


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda text: text.replace("values: [g6e.2xlarge]", "values: [g6e.4xlarge]"),
         "gpu-stage2: 0 NodePools offer g6e.2xlarge"),
        (lambda text: text.replace("values: [m6i.2xlarge]", "values: [m6i.2xlarge, m6i.4xlarge]"),
         "cpu: 2 NodePools offer m6i.4xlarge"),
        (lambda text: text.replace("values: [on-demand]", "values: [spot, on-demand]", 1),
         "head: capacity types ['on-demand', 'spot']"),
        (lambda text: text.replace("volumeSize: 300Gi", "volumeSize: 100Gi"),
         "gpu-stage1: root volume 100Gi too small"),
    ],
    ids=["no-pool", "two-pools", "spot-head", "small-disk"],
)  # fmt: skip
def test_the_karpenter_check_fails_on_a_pool_that_cannot_serve_its_group(edit, expected):
    docs = [d for d in yaml.safe_load_all(edit((EKS / "karpenter.yaml").read_text())) if d]
    assert expected in karpenter_problems(docs)


def test_eksctl_node_groups_serve_every_group_and_scale_from_zero():
    (config,) = eks_docs("eksctl-nodegroups.yaml")
    prefix = "k8s.io/cluster-autoscaler/node-template/"
    for name, want in kuberay_node_groups().items():
        (group,) = [g for g in config["managedNodeGroups"]
                    if want["type"] in g.get("instanceTypes", [g.get("instanceType")])]  # fmt: skip
        tags = group["tags"]
        assert group["minSize"] == 0 and group["maxSize"] >= want["max"], name
        assert tags[f"{prefix}label/{INSTANCE_TYPE_LABEL}"] == want["type"], name
        assert "k8s.io/cluster-autoscaler/enabled" in tags
        assert group.get("taints", []) == ([GPU_TAINT] if want["gpu"] else []), name
        if want["gpu"]:
            assert tags[f"{prefix}taint/nvidia.com/gpu"] == "true:NoSchedule", name
            assert tags[f"{prefix}resources/nvidia.com/gpu"] == "1", name
        assert group.get("spot", False) == want["spot"], name
        assert want["disk"] <= ephemeral_room(group["volumeSize"]), name


# -- aws.yaml: IAM, spot, caches ------------------------------------------------------------------------


def iam_policy(name: str) -> dict:
    return json.loads((IAM / name).read_text())


def statements(policy: dict) -> list[dict]:
    found = policy["Statement"]
    return found if isinstance(found, list) else [found]


def _listed(value) -> list[str]:
    return value if isinstance(value, list) else [value]


def test_iam_policies_are_valid_and_least_privilege():
    for path in sorted(IAM.glob("*.json")):
        policy = json.loads(path.read_text())
        assert policy["Version"] == "2012-10-17", path.name
        for statement in statements(policy):
            assert statement["Effect"] in ("Allow", "Deny"), path.name
            actions = _listed(statement["Action"])
            assert all(re.fullmatch(r"[a-z0-9-]+:[A-Za-z*]+", a) for a in actions), path.name
            assert "*" not in actions and not any(a.endswith(":*") for a in actions), path.name
            if "Principal" in statement:
                continue  # the trust policy
            resources = _listed(statement["Resource"])
            if resources == ["*"]:  # only actions that cannot be scoped to a resource
                assert all(a.startswith("ec2:") or a == "ecr:GetAuthorizationToken" for a in actions)
            for resource in resources:
                assert resource == "*" or resource.startswith("arn:aws:"), path.name
    # Data access: the sensitive output has its own policy, on a prefix the others never touch.
    names = ("u2s-input-read.json", "u2s-safe-output-write.json", "u2s-sensitive-output-write.json")
    data = {n: [r for s in statements(iam_policy(n)) for r in _listed(s["Resource"])] for n in names}
    sensitive = {r for r in data["u2s-sensitive-output-write.json"] if r.endswith("/*")}
    assert sensitive and not sensitive & {r for n, rs in data.items() if "sensitive" not in n for r in rs}
    reads = {a for s in statements(iam_policy("u2s-input-read.json")) for a in _listed(s["Action"])}
    assert reads == {"s3:ListBucket", "s3:GetObject"}  # read-only


def test_the_launcher_head_can_start_workers_with_their_role():
    config = yaml.safe_load(LAUNCHER.read_text())
    head = config["head_node_type"]
    profiles = {
        n: t["node_config"]["IamInstanceProfile"]["Name"] for n, t in config["available_node_types"].items()
    }
    assert profiles.pop(head) == "u2s-head"  # Ray creates no over-broad profile of its own
    (worker_profile,) = set(profiles.values())
    launcher = statements(iam_policy("u2s-head-launcher.json"))
    (pass_role,) = [s for s in launcher if "iam:PassRole" in _listed(s["Action"])]
    assert [r.rsplit("/", 1)[-1] for r in _listed(pass_role["Resource"])] == [worker_profile]
    assert pass_role["Condition"]["StringEquals"]["iam:PassedToService"] == "ec2.amazonaws.com"
    granted = {a for s in launcher for a in _listed(s["Action"])}
    assert {
        "ec2:RunInstances",
        "ec2:TerminateInstances",
        "ec2:CreateTags",
        "ec2:DescribeInstances",
    } <= granted


def test_launcher_spot_groups_caches_and_worker_cap():
    config = yaml.safe_load(LAUNCHER.read_text())
    node_types = config["available_node_types"]
    market = {
        n: t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") for n, t in node_types.items()
    }
    assert {n for n, m in market.items() if m == "spot"} == SPOT_GROUPS
    workers = [t for n, t in node_types.items() if n != config["head_node_type"]]
    assert config["max_workers"] >= sum(t["max_workers"] for t in workers)  # each group reaches its maximum
    # The host directory mounted as the cache exists and belongs to the container's user (uid 1000).
    (volume,) = [o.split()[1] for o in config["docker"]["run_options"] if o.startswith("-v ")]
    host, container = volume.split(":")[:2]
    assert container == CACHE_DIR
    setup = " && ".join(config["initialization_commands"])
    assert f"mkdir -p {host}" in setup and f"chown 1000:100 {host}" in setup
    env = dict(o.split()[1].split("=", 1) for o in config["docker"]["run_options"] if o.startswith("-e "))
    assert env == {"HF_HOME": f"{CACHE_DIR}/huggingface", "VLLM_CACHE_ROOT": f"{CACHE_DIR}/vllm",
                   "U2S_MODEL_CACHE": f"{CACHE_DIR}/u2s-models"}  # fmt: skip

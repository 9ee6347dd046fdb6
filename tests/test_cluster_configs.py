"""cluster/: the KubeRay manifests against the KubeRay CRDs, the launcher YAML against Ray's own schema,
and every preset's pools against every config's worker groups."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from u2s.cluster import NodeGroup, load_node_groups, placement
from u2s.config import PRESETS, load_config
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


def ec2_errors(config: dict) -> list[str]:
    """``node_config`` keys go to EC2 RunInstances: each must be one of its parameters (botocore's model)."""
    import botocore.session

    members = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances")
    known = set(members.input_shape.members)
    return [f"{name}.{key}" for name, t in config["available_node_types"].items()
            for key in t["node_config"] if key not in known]  # fmt: skip


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

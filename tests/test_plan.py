"""`u2s plan`: GPUs per pool, ratios, hours and cost, from estimates or from bench --json figures."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from u2s.cli import app
from u2s.cluster import launcher_max_workers, load_node_groups
from u2s.config import load_config
from u2s.instances import INSTANCE_TYPES
from u2s.pipeline import stage_pools
from u2s.plan import CARDS, BenchStage, card_for, is_verify_pool, load_cluster, make_plan
from u2s.testing.cluster_job import pool_overrides

REPO = Path(__file__).resolve().parents[1]
AWS = REPO / "cluster" / "aws.yaml"
KUBERAY = REPO / "cluster" / "kuberay" / "raycluster.yaml"


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
        if line.split()[:1] in [[p] for p in gpu_pools] and not line.startswith(" ")  # not the cost rows
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
    sizes = {name: r.pool_bounds() for name, r in pools.items() if r.num_gpus and not is_verify_pool(name)}
    assert len(sets) == len(sizes)
    # stage2.verify's pools (one per attempt, sized in its own section) are listed as comments.
    verify = {name: int(n) for name, n in re.findall(r"# (\S+): \[1,(\d+)\] in stage2.verify", result.output)}
    assert set(verify) == {name for name, r in pools.items() if r.num_gpus and is_verify_pool(name)}
    gpus = sum(high * pools[name].num_gpus for name, (_, high) in sizes.items())
    assert gpus + sum(n * pools[name].num_gpus for name, n in verify.items()) == 24
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
    args = ["--images", "10000000", "--gpu", "H100", "--pool-gpu", "edit=L40S", "--gpus", "200",
            "--set", "stage2.verify.checks=[]"]  # fmt: skip
    result = run_plan(
        *args, "--cluster", str(REPO / "cluster" / "aws.yaml"), *[a for o in pins for a in ("--set", o)]
    )
    assert result.exit_code == 0, result.output
    short = r"too small: gpu-stage2 needs (\d+) nodes for (\d+) GPUs \(edit \d+\), it allows (\d+)$"
    match = re.search(short, result.output, re.MULTILINE)
    stage2 = next(g for g in load_node_groups(AWS) if g.name == "gpu-stage2")
    assert match and int(match[3]) == stage2.max_workers < int(match[1]) == int(match[2])  # 1 GPU a node
    edit_line = next(line for line in result.output.splitlines() if line.startswith("edit "))
    assert f" {match[2]} L40S " in edit_line


# -- cluster capacity, node cost, prices, tensor parallelism --------------------------------------------


def _table_gpus(output: str) -> dict[str, int]:
    """GPUs per pool, from the plan's table (pool, rows, rate, /s, GPU-h, share, GPUs, type...)."""
    gpu_pools = [n for n, r in stage_pools(load_config(preset="paper")).items() if r.num_gpus]
    rows = [line.split() for line in output.splitlines() if not line.startswith(" ")]
    return {row[0]: int(row[6]) for row in rows if row[:1] in [[p] for p in gpu_pools]}


@pytest.mark.parametrize("cluster", [AWS, KUBERAY], ids=["launcher", "kuberay"])
def test_paper_preset_says_the_gpu_groups_are_too_small_together(cluster):
    """The paper's pools have no accelerator_type: each fits both GPU groups, so they are checked against
    the two groups' maxima together (pools pinned to no single group used to pass unchecked)."""
    result = run_plan("--images", "10000000", "--gpu", "L40S", "--cluster", str(cluster))
    assert result.exit_code == 0, result.output
    wanted = sum(_table_gpus(result.output).values())
    groups = {g.name: g for g in load_node_groups(cluster)}
    allow = (groups["gpu-stage1"].max_workers, groups["gpu-stage2"].max_workers)
    assert wanted > sum(allow)  # ~118 L40S for a day against 10 + 16 one-GPU nodes
    assert (
        f"too small: gpu-stage1 + gpu-stage2 need {wanted} nodes together for {wanted} GPUs "
        f"(inspect+describe" in result.output
    )
    assert f"they allow {allow[0]} + {allow[1]}" in result.output
    cap = launcher_max_workers(cluster)
    if cluster == AWS:  # the launcher's global cap counts the CPU workers too (the cpu group's max: 8)
        cpu = groups["cpu"].max_workers
        assert cap is not None and wanted + cpu > cap
        assert (f"too small: the launcher's max_workers allows {cap} worker nodes of all types together; "
                f"the run holds {wanted + cpu} ({wanted} GPU + {cpu} CPU)") in result.output  # fmt: skip
    else:
        assert cap is None and "launcher's max_workers" not in result.output


def test_a_plan_that_fits_the_cluster_prints_no_warning():
    result = run_plan("--images", "200000", "--gpu", "L40S", "--gpus", "20", "--cpu-nodes", "4",
                      "--cluster", str(AWS))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sum(_table_gpus(result.output).values()) == 20
    assert "too small" not in result.output and "note:" not in result.output


def test_the_launcher_cap_counts_every_worker_node(tmp_path):
    """20 GPU nodes fit the GPU groups (10 + 16), but not a global max_workers of 20 with 2 CPU nodes."""
    config = yaml.safe_load(AWS.read_text())
    config["max_workers"] = 20
    small = tmp_path / "aws-small.yaml"
    small.write_text(yaml.safe_dump(config))
    assert launcher_max_workers(small) == 20 and launcher_max_workers(KUBERAY) is None
    result = run_plan("--images", "200000", "--gpu", "L40S", "--gpus", "20", "--cpu-nodes", "2",
                      "--cluster", str(small))  # fmt: skip
    assert result.exit_code == 0, result.output
    too_small = [line for line in result.output.splitlines() if "too small:" in line]
    assert too_small == [
        "  too small: the launcher's max_workers allows 20 worker nodes of all types together; "
        "the run holds 22 (20 GPU + 2 CPU)"
    ]


def _one_gpu_pool(tmp_path: Path) -> list[str]:
    """cpu-tiny with only the editor on a GPU, measured at exactly 1 image/s on an L40S: simple numbers."""
    bench = _bench_file(tmp_path, rows_per_s=1.0, card="NVIDIA L40S", settings={})
    return ["--preset", "cpu-tiny", "--set", "stage2.resources.num_gpus=1", "--bench", str(bench)]


def test_cost_prices_the_gpu_nodes_the_head_and_the_cpu_workers(tmp_path):
    """14,400 images, half flagged: 7,200 edits at 1/s = 2 GPU-hours; on 1 GPU, 2 hours' wall. With
    cluster/aws.yaml: one g6e.2xlarge (gpu-stage2, the L40S group), the m6i.2xlarge head and 3 m6i.4xlarge
    CPU workers, each for those 2 hours."""
    args = [*_one_gpu_pool(tmp_path), "--images", "14400", "--gpu", "L40S", "--gpus", "1"]
    result = run_plan(*args, "--cluster", str(AWS), "--cpu-nodes", "3")
    assert result.exit_code == 0, result.output
    price = {
        name: INSTANCE_TYPES[name].usd_per_hour for name in ("g6e.2xlarge", "m6i.2xlarge", "m6i.4xlarge")
    }
    assert price == {"g6e.2xlarge": 2.242, "m6i.2xlarge": 0.384, "m6i.4xlarge": 0.768}  # the table's
    gpu_usd = 2 * 2.242  # 1 node x 2 h
    other_usd = 2 * 0.384 + 3 * 2 * 0.768  # head + 3 CPU nodes, 2 h each
    assert "total: 2.0 GPU-hours; 1 GPUs -> 2.0 h wall" in result.output
    lines = {
        line.split("  ")[1].strip(): line
        for line in result.output.splitlines()
        if line.startswith("  ") and "$" in line
    }
    assert "1 x g6e.2xlarge (gpu-stage2) at $2.242/h (1 GPU)" in lines["edit"]
    assert f"${gpu_usd:,.0f}" in lines["GPU nodes"]  # $4
    assert "1 x m6i.2xlarge at $0.384/h" in lines["head"]
    assert "3 x m6i.4xlarge at $0.768/h; --cpu-nodes" in lines["CPU workers (cpu)"]
    assert f"${other_usd:,.0f}" in lines["head + CPU nodes"]  # $5
    assert f"${gpu_usd + other_usd:,.0f}" in lines["total"]  # $10
    # The same run, exactly (make_plan), and by default every CPU group at its maximum.
    cfg = load_config(preset="cpu-tiny", overrides=["stage2.resources.num_gpus=1"])
    bench = [BenchStage.model_validate(s) for s in json.loads((tmp_path / "gpu.json").read_text())["stages"]]
    exact = make_plan(cfg, 14400, card_for("L40S"), bench, gpus=1, cluster=load_cluster(AWS), cpu_nodes=3)
    assert exact.wall_hours == pytest.approx(2.0)
    assert (exact.gpu_cost, exact.node_cost) == (pytest.approx(gpu_usd), pytest.approx(other_usd))
    default = make_plan(cfg, 14400, card_for("L40S"), bench, gpus=1, cluster=load_cluster(AWS))
    cpu_max = next(g for g in load_node_groups(AWS) if g.name == "cpu").max_workers
    assert default.node_cost == pytest.approx(2 * 0.384 + cpu_max * 2 * 0.768)
    # Without a cluster: the GPU only, at the L40S card's price, which is g6e.2xlarge's (one L40S a node).
    alone = make_plan(cfg, 14400, card_for("L40S"), bench, gpus=1)
    assert (alone.cost, alone.node_cost) == (pytest.approx(gpu_usd), 0.0)


def test_card_prices_come_from_the_instance_table():
    """One price table: each card is priced as an instance type of u2s/instances.py carrying that GPU."""
    for card in CARDS.values():
        if card.instance is None:  # no instance type with this GPU in the table: a labelled list price
            assert card.list_price and "u2s/instances.py" in card.price_source
            assert not [t for t in INSTANCE_TYPES.values() if t.gpu == card.name]  # else price it from there
            continue
        node = INSTANCE_TYPES[card.instance]
        assert node.gpu == card.name
        assert card.usd_per_hour == node.usd_per_hour / node.gpus
    assert card_for("L40S").usd_per_hour == 2.242  # g6e.2xlarge, the configs' L40S node, not g6e.xlarge
    result = run_plan("--images", "1000", "--gpu", "L40S")
    edit_line = next(line for line in result.output.splitlines() if line.startswith("  edit "))
    assert "at $2.242/GPU-hour: g6e.2xlarge $2.242/h" in edit_line
    assert "head, CPU workers, disks and S3 not counted" in result.output


def test_pinned_pools_are_priced_as_their_groups_instance_type():
    pins = pool_overrides("edit", accelerator_type="L40S") + pool_overrides(
        "instruct", accelerator_type="H100"
    )
    sets = [a for o in pins for a in ("--set", o)]
    result = run_plan(
        "--images", "100000", "--gpu", "H100", "--pool-gpu", "edit=L40S", "--cluster", str(AWS), *sets
    )
    assert result.exit_code == 0, result.output
    costs = {
        line.split()[0]: line
        for line in result.output.splitlines()
        if line.startswith("  ") and "/h (" in line
    }
    assert "x g6e.2xlarge (gpu-stage2) at $2.242/h" in costs["edit"]
    assert "x p5.4xlarge (gpu-stage1) at $6.880/h" in costs["instruct"]


def test_tensor_parallel_workers_must_share_a_node():
    """TP=2 asks for 2 GPUs on one node (STRICT_PACK): no one-GPU group can hold an actor, so the pool
    fits NONE and the plan fails (exit 1); its actors are counted as 2 GPUs each."""
    tp2 = ["--set", "stage1.vllm.tensor_parallel_size=2"]
    alone = run_plan("--images", "1000000", "--gpu", "H100", *tp2)
    assert alone.exit_code == 0, alone.output
    vlm = next(
        line for line in alone.output.splitlines() if "stage1.calls.inspect.resources.pool_size" in line
    )
    actors = int(re.search(r"\[1,(\d+)\]", vlm)[1])
    assert "2 GPUs per actor, 2 engine workers on one node" in vlm
    assert _table_gpus(alone.output)["inspect+describe"] == 2 * actors
    result = run_plan("--images", "1000000", "--gpu", "H100", *tp2, "--cluster", str(AWS))
    assert result.exit_code == 1, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("  inspect+describe NONE"))
    assert "2 engine workers" in line and "need 2 GPUs and 5 CPUs on one node (STRICT_PACK)" in line
    assert "a gpu-stage1 node 1 GPU" in line and "a gpu-stage2 node 1 GPU" in line
    assert re.search(r"^  instruct +gpu-stage1, gpu-stage2$", result.output, re.MULTILINE)  # its own engine


def test_tensor_parallel_pool_lands_on_a_multi_gpu_group(tmp_path):
    """An 8-GPU group holds four TP=2 actors a node: the VLM pool lands there, priced per whole node."""
    config = yaml.safe_load(AWS.read_text())
    config["available_node_types"]["gpu-8x"] = {
        "min_workers": 0, "max_workers": 4, "resources": {"CPU": 192, "GPU": 8, "accelerator_type:H100": 1},
        "node_config": {"InstanceType": "p5.48xlarge"},
    }  # fmt: skip
    eight = tmp_path / "aws-8x.yaml"
    eight.write_text(yaml.safe_dump(config))
    cfg = load_config(preset="paper", overrides=["stage1.vllm.tensor_parallel_size=2"])
    plan = make_plan(cfg, 1_000_000, card_for("H100"), gpus=40, cluster=load_cluster(eight))
    assert plan.fit is not None and plan.fit.placement["inspect+describe"] == ["gpu-8x"]
    vlm = next(p for p in plan.gpu_pools if p.name == "inspect+describe")
    assert vlm.gpus % 2 == 0 and vlm.replicas == vlm.gpus / 2
    assert vlm.group == "gpu-8x" and (vlm.nodes - 1) * 8 < vlm.gpus <= vlm.nodes * 8  # whole 8-GPU nodes
    assert vlm.node_price == 55.04 and vlm.price == pytest.approx(6.88)
    assert vlm.usd_per_hour == vlm.nodes * 55.04
    # A configured group that may spread the workers fits one-GPU nodes, and says what that costs.
    bundles = "[{GPU: 1, CPU: 4}, {GPU: 1, CPU: 1}]"
    spread = ["stage1.vllm.tensor_parallel_size=2",
              f"stage1.vllm.placement_group_config={{bundles: {bundles}, strategy: PACK}}"]  # fmt: skip
    result = run_plan(
        "--images",
        "100000",
        "--gpu",
        "H100",
        "--cluster",
        str(AWS),
        *[a for o in spread for a in ("--set", o)],
    )
    assert result.exit_code == 0, result.output
    assert (
        "note: inspect+describe: placement_group_config.strategy PACK: the 2 engine workers" in result.output
    )


# -- stage2.verify ---------------------------------------------------------------------------------------


def test_verification_costs_a_check_per_edit_and_a_re_edit_per_failed_check(paper):
    card = card_for("H100")
    plan = make_plan(paper, 1_000_000, card, flagged=0.4, verify_fail=0.5)
    pools = {p.name: p for p in plan.pools}
    flagged = 1_000_000 * 0.4
    # Every edit is checked; attempt k sees the flagged rows whose k - 1 checks all failed.
    assert [pools[n].rows for n in ("edit", "verify", "edit.2", "verify.2", "edit.3", "verify.3")] == [
        flagged, flagged, flagged / 2, flagged / 2, flagged / 4, flagged / 4
    ]  # fmt: skip
    assert pools["edit.3"].rate is None  # the ladder's blur rung runs on CPUs
    assert pools["edit.2"].gpu_hours == pytest.approx(
        pools["edit"].gpu_hours / 2
    )  # same editor, half the rows
    # A check is call A on the edit: the cost of inspecting, per edited row.
    assert pools["verify"].rate.rows_per_s > pools["inspect+describe"].rate.rows_per_s
    off = make_plan(load_config(preset="paper", overrides=["stage2.verify.checks=[]"]), 1_000_000, card,
                    flagged=0.4)  # fmt: skip
    assert not any(is_verify_pool(p.name) for p in off.pools) and off.gpu_hours < plan.gpu_hours
    fewer = make_plan(paper, 1_000_000, card, flagged=0.4, verify_fail=0.1)
    assert fewer.gpu_hours < plan.gpu_hours


def test_plan_prints_what_verification_adds_per_flagged_row():
    result = run_plan("--images", "100000", "--gpu", "H100", "--verify-fail", "0.5")
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("stage2.verify"))
    assert "up to 3 edits" in line and "50% of checks" in line and "1.75 edits and checks" in line
    seconds = float(re.search(r"add ([\d.]+) GPU-s per flagged row", line)[1])
    assert seconds > 0
    faces = run_plan("--images", "100000", "--gpu", "H100", "--set", "stage2.verify.checks=[faces]")
    assert faces.exit_code == 0 and "verify (1 CPU each)" in faces.output  # dlib: a CPU pool


def _finetune_totals(output: str) -> tuple[float, int, float]:
    """(GPU-hours, GPUs, wall hours) of a `plan --finetune` printout."""
    m = re.search(r"total: ([\d,.]+) GPU-hours; (\d+) GPUs? .*-> ([\d,.]+) h wall", output)
    assert m, output
    return float(m[1].replace(",", "")), int(m[2]), float(m[3].replace(",", ""))


def test_finetune_plan_is_samples_times_flop_per_sample_at_the_mfu():
    from u2s.plan import DENOISER_TFLOP_PER_STEP

    result = run_plan("--finetune", "safe_attention", "--images", "80000", "--gpu", "H100", "--gpus", "4")
    assert result.exit_code == 0, result.output
    gpu_hours, gpus, wall = _finetune_totals(result.output)
    # 256 px is a quarter of the 512² count; forward + backward ≈ 3 forwards; 200 epochs; 40% of peak.
    expected = 80000 * 200 * DENOISER_TFLOP_PER_STEP["safe_attention"] / 4 * 3 / (989 * 0.40) / 3600
    assert gpu_hours == pytest.approx(expected, rel=0.01)
    assert gpus == 4 and wall == pytest.approx(gpu_hours / 4, rel=0.01)
    assert "num_workers: 4" in result.output

    half = _finetune_totals(run_plan("--finetune", "safe_attention", "--images", "80000", "--gpu", "H100",
                                     "--gpus", "4", "--epochs", "100", "--mfu", "0.8").output)  # fmt: skip
    assert half[0] == pytest.approx(gpu_hours / 4, rel=0.01)
    lora = _finetune_totals(run_plan("--finetune", "safe_attention", "--images", "80000", "--gpu", "H100",
                                     "--gpus", "4", "--lora").output)  # fmt: skip
    assert lora[0] == pytest.approx(gpu_hours * 2 / 3, rel=0.01)


def test_finetune_plan_picks_the_fewest_gpus_for_the_hours_target():
    result = run_plan("--finetune", "flux_kontext", "--lora", "--images", "50000", "--gpu", "H100",
                      "--epochs", "4", "--hours", "2")  # fmt: skip
    assert result.exit_code == 0, result.output
    gpu_hours, gpus, wall = _finetune_totals(result.output)
    assert wall <= 2 < gpu_hours / (gpus - 1) and "512 px" in result.output
    bad = run_plan("--finetune", "blur", "--images", "10", "--gpu", "H100")
    assert bad.exit_code == 2 and "cannot be fine-tuned" in bad.output


def _cpu_cores(output: str) -> tuple[float, float]:
    line = next(line for line in output.splitlines() if line.startswith("CPU work outside the models"))
    found = re.search(r"-> ([\d,.]+) cores while the GPUs run, ([\d.]+) per GPU", line)
    assert found, line
    return float(found[1].replace(",", "")), float(found[2])


def test_plan_sizes_cpu_cores_from_the_cpu_cost_per_row(tmp_path):
    """The CPU cores per GPU follow the CPU-seconds per row given (a number, or the bench's JSON), and the
    plan names the figure's source; with a cluster, the CPU nodes that hold those cores."""
    args = ("--images", "10000000", "--gpu", "H100", "--gpus", "64")
    low = run_plan(*args, "--cpu-cost", "0.02")
    assert low.exit_code == 0, low.output
    measured = tmp_path / "cpu.json"
    measured.write_text(json.dumps({"cpu_seconds_per_row": 0.08, "source": "cluster_sim run"}))
    high = run_plan(*args, "--cpu-cost", str(measured))
    assert high.exit_code == 0, high.output
    (cores_low, per_gpu_low), (cores_high, per_gpu_high) = _cpu_cores(low.output), _cpu_cores(high.output)
    assert cores_high == pytest.approx(4 * cores_low, rel=0.02) and per_gpu_high > per_gpu_low > 0
    assert "cluster_sim run" in high.output and "--cpu-cost" in low.output
    default = run_plan(*args)
    assert "recorded: bench/cluster_sim.py" in default.output
    with_cluster = run_plan(*args, "--cpu-cost", str(measured), "--cluster", str(AWS))
    nodes = re.search(r"= (\d+) x cpu \((\d+) CPUs\)", with_cluster.output)
    assert nodes, with_cluster.output
    assert int(nodes[1]) == -(-_cpu_cores(with_cluster.output)[0] // float(nodes[2]))


def test_plan_edit_rate_is_the_call_cost_model_the_simulator_runs(paper):
    """One cost model: the plan's editor estimate is `u2s.costs`' a + b·n call at the pool's batch."""
    from u2s.costs import editor_call_cost
    from u2s.plan import edit_batch, edit_tflop_per_row

    h100 = card_for("H100")
    plan = make_plan(paper, 100_000, h100, gpus=8)
    edit = next(p for p in plan.pools if p.name == "edit")
    cost = editor_call_cost(edit_tflop_per_row(paper), h100.peak_tflops)
    assert edit.rate.rows_per_s == pytest.approx(cost.rate(edit_batch(paper)))
    assert cost.rate(1) < edit.rate.rows_per_s < 1 / cost.b  # a fixed cost per call: batches pay off

"""A simulated GPU cluster: the real u2s plan on a local Ray cluster that declares GPUs it does not have.

Everything but the model calls is real: listing, fetch from an S3 server (moto, in a process of its own),
decode, metadata strip, thumbnails, Ray Data's scheduling and back-pressure, the actor pools and their
batches, the edit stage's grouping and re-encoding, and the Parquet writes. The model calls are the timed
stand-ins of ``bench/standins.py``, registered through the engine and editor registries: vLLM-style
engines (continuous batching, ``max_num_seqs`` requests in flight) for stage 1, an editor that holds its
actor ``a + b·n`` seconds per call of ``n`` images. Their times are :mod:`u2s.costs`' model of the paper
preset's models (InternVL2.5-8B, Qwen3-4B on H100; InstructPix2Pix at 512 px on L40S: two GPU kinds,
declared as ``accelerator_type`` resources), the same model ``u2s plan`` uses. The pools get the GPUs
``u2s plan --gpus N`` gives them.

Two CPU cores cannot feed real H100s, so every simulated GPU runs ``scale`` times slower than the real one
(the same factor for all, so the pools' ratios hold): the factor that puts the plan's ideal throughput (the
bottleneck pool's capacity) at ``--rows-per-s``. Printed per run:

* per pool: actors (over time with ``--autoscale``), busy fraction (time inside the stand-in's calls or
  engine steps / the actor's time from its first call to its end), mean batch fill (editor: images per call
  / max batch; engines: requests in flight per step / ``max_num_seqs``);
* per job: rows/s against the ideal (after start-up: from the first stage-1 call to the end; and over the
  whole run), CPU-seconds per row outside the stand-ins (user + system time of the driver and every Ray
  process; the stand-ins sleep, which costs no CPU), the peak memory of the driver and of all Ray processes
  together, and the object store's spilled bytes;
* the goals (PASS/MISS, with what holds a missed one back): the bottleneck pool busy >= 90%, editor
  batches >= 90% full at 25% flags, throughput >= 90% of the ideal, that ratio within 10% from N to
  10 N images, Ray's peak memory at 10 N <= 1.25 x that at N.

    python bench/cluster_sim.py                                  # 2 000 images at 5%, 25%, 60% flags
    python bench/cluster_sim.py --scale-up 10 --flag-rates 0.25  # 2 000 and 20 000 images
    python bench/cluster_sim.py --autoscale                      # pools [1, N]: actor counts over time
    python bench/cluster_sim.py --set stage2.resources.batch_size=32   # any config override
    python bench/cluster_sim.py --cpu-json cpu.json              # then: u2s plan --cpu-cost cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info

REPO = Path(__file__).resolve().parents[1]
BUCKET = "u2s-sim"
#: COCO-like sizes and shares (most COCO images have a 640 px long side; 4:3 landscape dominates).
SIZES = [((640, 480), 0.50), ((480, 640), 0.15), ((640, 427), 0.15), ((427, 640), 0.05),
         ((500, 375), 0.10), ((612, 612), 0.05)]  # fmt: skip
GOAL = 0.90


# --- input ------------------------------------------------------------------------------------------


def make_images(folder: Path, n: int, seed: int = 0) -> None:
    """``n`` JPEGs (quality 85) of the COCO-like size mix: smooth colour fields with a random block each,
    so every image (and its thumbnail) differs. Kept in ``folder`` for later runs."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.jpg"))) >= n:
        return
    rng = np.random.default_rng(seed)
    sizes, shares = zip(*SIZES, strict=True)
    bases = {}
    for w, h in sizes:
        y, x = np.mgrid[0:h, 0:w]
        bases[(w, h)] = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1).astype(np.uint8)
    for i in range(n):
        w, h = sizes[rng.choice(len(sizes), p=shares)]
        pixels = bases[(w, h)].copy()
        top, left = rng.integers(0, h - 64), rng.integers(0, w - 64)
        pixels[top : top + 64, left : left + 64] = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=85)


def start_s3() -> tuple[subprocess.Popen, str]:
    """A moto S3 server in its own process (its CPU is not the job's)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    return server, endpoint


def upload(endpoint: str, folder: Path, prefix: str, n: int) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket=BUCKET)
    files = sorted(folder.glob("*.jpg"))[:n]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda f: s3.upload_file(str(f), BUCKET, f"{prefix}/{f.name}"), files))


# --- the simulated machine ------------------------------------------------------------------------------


def real_config(flag_rate: float, settings: list[str]):
    """The paper preset as simulated (verification off: one edit pool), with the bench's overrides."""
    from u2s.config import load_config

    return load_config(preset="paper", overrides=["stage2.verify.checks=[]", *settings])


def timing(cfg: Any, flag_rate: float, gpus: int, stage1_gpu: str, edit_gpu: str) -> dict[str, Any]:
    """The plan's pools for ``gpus`` GPUs and the real cards' per-call times (from :mod:`u2s.costs`)."""
    from u2s.costs import editor_call_cost, stage1_seconds
    from u2s.plan import (
        CALL_TOKENS,
        card_for,
        edit_batch,
        edit_tflop_per_row,
        make_plan,
        stage1_tflop_per_row,
    )

    s1, ed = card_for(stage1_gpu), card_for(edit_gpu)
    plan = make_plan(cfg, 100_000, s1, flagged=flag_rate, gpus=gpus, pool_cards={"edit": ed})
    calls = {c: stage1_seconds(*stage1_tflop_per_row(cfg, c, 0.0), s1.peak_tflops) for c in CALL_TOKENS}
    editor = editor_call_cost(edit_tflop_per_row(cfg), ed.peak_tflops)
    return {"replicas": {p.name: p.replicas for p in plan.gpu_pools}, "engine_seconds": calls,
            "editor": editor, "max_batch": edit_batch(cfg)}  # fmt: skip


def capacities(cfg: Any, t: dict[str, Any], flag_rate: float, step_s: float | None, actors: dict[str, int]):
    """Job rows/s each pool can carry with ``actors`` actors (stand-in timing: whole steps of ``step_s``;
    None: the continuous model)."""
    from u2s.costs import ContinuousBatching

    out = {}
    for pool in cfg.stage1.pools():
        slots = cfg.stage1.vllm_for(pool.vision).max_num_seqs or 64
        engine = ContinuousBatching(step_s or 1e-9, slots)
        per_row = 0.0
        for call in pool.calls:
            share = 1.0 if call == "inspect" else flag_rate
            seconds = t["engine_seconds"][call]
            full = engine.steps(seconds) * engine.step_s / slots if step_s else seconds
            per_row += share * full  # engine-seconds per job row (calls after inspect: flagged rows)
        out[pool.name] = actors[pool.name] / per_row
    out["edit"] = actors["edit"] * t["editor"].rate(t["max_batch"]) / flag_rate
    return out


class Sampler(threading.Thread):
    """Every ``interval`` s: CPU time and RSS of the driver and all its descendant processes (Ray's), less
    the S3 server's."""

    def __init__(self, exclude: set[int], interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        import psutil

        self.me = psutil.Process()
        self.exclude, self.interval = exclude, interval
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.peak_all = self.peak_driver = 0
        self.series: list[tuple[float, float]] = []  # (time, CPU-seconds used so far)
        self._done = threading.Event()

    def sample(self) -> None:
        import psutil

        total = 0
        for p in [self.me, *self.me.children(recursive=True)]:
            if p.pid in self.exclude:
                continue
            try:
                cpu, rss = p.cpu_times(), p.memory_info().rss
            except psutil.Error:
                continue
            used = cpu.user + cpu.system
            self.first.setdefault(p.pid, used)
            self.last[p.pid] = used
            total += rss
            if p.pid == self.me.pid:
                self.peak_driver = max(self.peak_driver, rss)
        self.peak_all = max(self.peak_all, total)
        self.series.append((time.time(), self.used()))

    def used(self) -> float:
        return sum(self.last[p] - self.first[p] for p in self.last)

    def used_since(self, t: float) -> float:
        """CPU-seconds used after time ``t`` (from the last sample before it)."""
        before = [cpu for at, cpu in self.series if at <= t]
        return self.used() - (before[-1] if before else 0.0)

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self.sample()

    def stop(self) -> float:
        """Stop; the CPU-seconds used since the first sample."""
        self._done.set()
        self.join()
        self.sample()
        return self.used()


def read_records(folder: Path) -> list[dict[str, Any]]:
    """One entry per stand-in actor: its kind, settings and events."""
    actors = []
    for path in sorted(folder.glob("*.jsonl")):
        events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if events:
            actors.append({"kind": path.name.split("-")[0], "meta": events[0], "events": events})
    return actors


def pool_figures(actors: list[dict], end: float, start: float, samples: int = 12) -> dict[str, dict]:
    """Per pool: actors, busy fraction, mean fill, first call, actor counts over time."""
    pools: dict[str, dict] = {}
    for a in actors:
        a["pool"] = "edit" if a["kind"] == "editor" else ("vlm" if a["meta"]["vision"] else "llm")
        a["work"] = [e for e in a["events"] if e["event"] == ("call" if a["kind"] == "editor" else "step")]
        a["last"] = min(end, max(e["t"] for e in a["events"]))
        p = pools.setdefault(a["pool"], {"actors": 0, "worked": 0, "busy": 0.0, "life": 0.0, "filled": 0.0,
                                         "slots": 0.0, "first": math.inf, "spans": []})  # fmt: skip
        p["actors"] += 1
        p["worked"] += bool(a["work"])
        p["spans"].append((a["meta"]["t"], a["last"]))
        p["first"] = min([p["first"], *(e["start"] for e in a["work"])])
    for a in actors:
        meta, p = a["meta"], pools[a["pool"]]
        # An actor's time: from the pool's first call (or its own start, if later) to its end; an actor that
        # never got work counts as idle for that time.
        p["life"] += max(a["last"] - max(meta["t"], p["first"]), 0.0)
        for e in a["work"]:
            span = e["t"] - e["start"]
            if a["kind"] == "editor":
                p["busy"] += span
                p["filled"] += e["n"]
                p["slots"] += meta["max_batch"]
            elif e["n"]:
                p["busy"] += span
                p["filled"] += e["n"] * span
                p["slots"] += meta["max_num_seqs"] * span
    for p in pools.values():
        p["busy_fraction"] = p["busy"] / p["life"] if p["life"] else 0.0
        p["fill"] = p["filled"] / p["slots"] if p["slots"] else 0.0
        times = [start + (end - start) * k / (samples - 1) for k in range(samples)]
        p["over_time"] = [sum(s <= t <= e for s, e in p["spans"]) for t in times]
        del p["spans"]
    return pools


def spilled_mib() -> float:
    """MiB the object store spilled to disk in this cluster (NaN when Ray cannot say)."""
    import ray
    from ray._private.internal_api import memory_summary

    try:
        text = memory_summary(ray.get_runtime_context().gcs_address, stats_only=True)
    except Exception:  # a figure of the report, not of the run
        return math.nan
    found = re.search(r"Spilled (\d+) MiB", text)
    return float(found[1]) if found else 0.0


def simulate(args: argparse.Namespace, endpoint: str, n: int, flag_rate: float, autoscale: bool) -> dict:
    """One run of the real plan with the stand-ins; its figures."""
    import ray
    import standins

    cfg = real_config(flag_rate, args.set)
    t = timing(cfg, flag_rate, args.gpus, args.stage1_gpu, args.edit_gpu)
    names = {"vlm": next(p.name for p in cfg.stage1.pools() if p.vision),
             "llm": next(p.name for p in cfg.stage1.pools() if not p.vision), "edit": "edit"}  # fmt: skip
    fixed = {p: t["replicas"][p] for p in names.values()}
    real_ideal = min(capacities(cfg, t, flag_rate, None, fixed).values())
    scale = real_ideal / args.rows_per_s
    seconds = {c: s * scale for c, s in t["engine_seconds"].items()}
    editor = t["editor"].scaled(scale)
    sim = {**t, "engine_seconds": seconds, "editor": editor}
    caps = capacities(cfg, sim, flag_rate, args.step_s, fixed)
    ideal = min(caps.values())
    bottleneck = min(caps, key=caps.get)

    records = Path(tempfile.mkdtemp(prefix="u2s-sim-records-"))
    os.environ[standins.ENV] = json.dumps({
        "engine_seconds": seconds, "editor_a": editor.a, "editor_b": editor.b, "step_s": args.step_s,
        "flag_rate": flag_rate, "records": str(records),
    })  # fmt: skip
    standins.install()
    run_id = uuid.uuid4().hex[:8]
    out = f"s3://{BUCKET}/runs/{run_id}"
    size = {p: (f"[1,{args.gpus}]" if autoscale else f"[{r},{r}]") for p, r in fixed.items()}
    sets = [
        f"input.uri=s3://{BUCKET}/images-{n}", f"output.uri={out}/safe",
        f"output.sensitive_uri={out}/sensitive",
        f"storage.endpoint_url={endpoint}", "stage1.engine=standin", "stage2.editor=standin",
        "ray.decode.num_cpus=1", "ray.write_num_cpus=0.25",
    ]  # fmt: skip
    for call, pool in (("inspect", names["vlm"]), ("instruct", names["llm"])):
        where = f"stage1.calls.{call}.resources"
        sets += [
            f"{where}.pool_size={size[pool]}",
            f"{where}.num_cpus=0.1",
            f"{where}.accelerator_type={args.stage1_gpu}",
        ]
    sets += [f"stage2.resources.pool_size={size['edit']}", "stage2.resources.num_cpus=0.1",
             f"stage2.resources.accelerator_type={args.edit_gpu}"]  # fmt: skip
    sim_cfg = real_config(flag_rate, [*sets, *args.set])

    cores = os.cpu_count() or 2
    actors_max = sum(args.gpus if autoscale else r for r in fixed.values())
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "bench"), str(REPO), os.environ.get("PYTHONPATH", "")]
    )
    # Twice the cores as logical CPUs: fetch tasks wait on S3 much of the time, and Ray Data budgets tasks
    # by logical CPUs (with exactly the cores, it ran one decode task at a time next to the pools).
    for attempt in range(3):  # Ray gives its raylet 30 s to register: a loaded machine may miss that
        try:
            ray.init(
                num_cpus=2 * cores + math.ceil(0.1 * actors_max), num_gpus=args.gpus, include_dashboard=False,
                resources={f"accelerator_type:{gpu}": args.gpus for gpu in (args.stage1_gpu, args.edit_gpu)},
                object_store_memory=args.object_store_mib * 2**20, log_to_driver=args.verbose,
                runtime_env={"worker_process_setup_hook": "standins.install"},
            )  # fmt: skip
            break
        except Exception as e:
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            ray.shutdown()
    ray.data.DataContext.get_current().enable_progress_bars = False
    from u2s.pipeline import run

    sampler = Sampler({args.s3_pid})
    sampler.sample()
    sampler.start()
    start = time.time()
    summary = run(sim_cfg)
    end = time.time()
    cpu = sampler.stop()
    spilled = spilled_mib()
    ray.shutdown()

    pools = pool_figures(read_records(records), end, start)
    pools = {names[k]: v for k, v in pools.items()}
    first = min((p["first"] for p in pools.values()), default=start)
    steady = n / (end - first) if end > first else 0.0
    cpu_steady = sampler.used_since(first)  # without Ray's and the actors' start-up (imports)
    return {
        "images": n, "flag_rate": flag_rate, "autoscale": autoscale, "scale": scale, "ideal": ideal,
        "bottleneck": bottleneck, "capacities": caps, "actors": fixed, "rows": summary.rows,
        "by_status": summary.by_status, "flagged": summary.flagged, "wall_s": end - start,
        "rows_per_s": n / (end - start), "steady_rows_per_s": steady, "startup_s": first - start,
        "cpu_s_per_row": cpu_steady / n, "cpu_s_per_row_with_startup": cpu / n,
        "cpu_busy": cpu_steady / ((end - first) * cores),
        "peak_driver_mib": sampler.peak_driver / 2**20,
        "peak_ray_mib": sampler.peak_all / 2**20, "spilled_mib": spilled, "pools": pools,
        "max_batch": t["max_batch"], "stage_seconds": summary.stage_seconds,
    }  # fmt: skip


# --- report ------------------------------------------------------------------------------------------------


def held_back(r: dict) -> str:
    """What holds a run below its ideal."""
    b = r["pools"].get(r["bottleneck"], {})
    if b.get("worked", b.get("actors", 0)) < b.get("actors", 0):
        return (
            f"{r['bottleneck']}: only {b['worked']} of its {b['actors']} actors got work (Ray Data queues "
            "whole blocks at a few actors; rows per block: ray.decode.batch_size)"
        )
    if r["cpu_busy"] >= 0.85:
        return f"the CPUs ({r['cpu_busy']:.0%} busy: fetch, decode, thumbnails, encode, writes, Ray)"
    if r["bottleneck"] == "edit" and b.get("fill", 1) < GOAL:
        return f"edit: calls only {b['fill']:.0%} full (Ray batches of rows, few of them flagged)"
    # A pool is saturated when it is busy and full (an engine step with few requests in flight is not).
    use = {p: f["busy_fraction"] * (f["fill"] if p != "edit" else 1.0) for p, f in r["pools"].items()}
    busiest = max(use, key=use.get)
    if busiest != r["bottleneck"] and use[busiest] >= GOAL:
        return f"{busiest} (busy x fill {use[busiest]:.0%}: the real bottleneck)"
    if r["cpu_busy"] < 0.5:
        return (
            f"{r['bottleneck']} waits for rows while u2s's processes use {r['cpu_busy']:.0%} of the cores: "
            "the machine's other load or Ray Data's queues between pools"
        )
    busy = b.get("busy_fraction", 0.0)
    return f"{r['bottleneck']} waits for rows (busy {busy:.0%}): Ray Data's queues between pools"


def report(r: dict) -> list[str]:
    tag = f"{r['images']:,} images, {r['flag_rate']:.0%} flags" + (", autoscaling" if r["autoscale"] else "")
    lines = [
        f"== {tag}: {r['rows']:,} rows ({', '.join(f'{k} {v}' for k, v in sorted(r['by_status'].items()))}), "
        f"{r['flagged']} flagged; simulated GPUs {r['scale']:.2f}x the real cards' time",
        f"{'pool':<18}{'worked':>7}{'capacity':>10}{'busy':>7}{'fill':>7}  actors over time",
    ]
    for name, p in r["pools"].items():
        cap = r["capacities"].get(name, 0.0)
        mark = " <- bottleneck" if name == r["bottleneck"] else ""
        actors = f"{p.get('worked', p['actors'])}/{p['actors']}"
        lines.append(f"{name:<18}{actors:>7}{cap:>8.1f}/s{p['busy_fraction']:>7.0%}{p['fill']:>7.0%}  "
                     f"{' '.join(map(str, p['over_time']))}{mark}")  # fmt: skip
    lines += [
        f"job: {r['rows_per_s']:.1f} rows/s over {r['wall_s']:.0f} s, {r['steady_rows_per_s']:.1f} after "
        f"start-up ({r['startup_s']:.0f} s); ideal {r['ideal']:.1f} -> "
        f"{r['steady_rows_per_s'] / r['ideal']:.0%}",
        f"CPU: {r['cpu_s_per_row'] * 1e3:.1f} ms/row outside the stand-ins after start-up "
        f"({r.get('cpu_s_per_row_with_startup', 0) * 1e3:.0f} with it; {r['cpu_busy']:.0%} of the cores); "
        f"peak memory: driver {r['peak_driver_mib']:.0f} MiB, all Ray processes {r['peak_ray_mib']:.0f} MiB; "
        f"spilled {r['spilled_mib']:.0f} MiB",
    ]  # fmt: skip
    return lines


def goals(results: list[dict]) -> list[str]:
    lines = ["", "goals:"]

    def line(ok: bool, what: str, why: str = "") -> None:
        lines.append(f"  {'PASS' if ok else 'MISS'}  {what}" + ("" if ok else f"  <- {why}"))

    for r in results:
        if r["autoscale"]:
            continue
        tag = f"{r['images']:,} @ {r['flag_rate']:.0%}"
        b = r["pools"].get(r["bottleneck"], {"busy_fraction": 0.0})
        line(b["busy_fraction"] >= GOAL, f"{tag}: bottleneck {r['bottleneck']} busy {b['busy_fraction']:.0%}",
             held_back(r))  # fmt: skip
        ratio = r["steady_rows_per_s"] / r["ideal"]
        line(ratio >= GOAL, f"{tag}: throughput {ratio:.0%} of ideal", held_back(r))
        if abs(r["flag_rate"] - 0.25) < 1e-9 and "edit" in r["pools"]:
            fill = r["pools"]["edit"]["fill"]
            line(fill >= GOAL, f"{tag}: editor batches {fill:.0%} full (max {r['max_batch']})",
                 "stage2: Ray batches of rows hold few flagged images")  # fmt: skip
    by_rate: dict[float, list[dict]] = {}
    for r in results:
        if not r["autoscale"]:
            by_rate.setdefault(r["flag_rate"], []).append(r)
    for rate, runs in by_rate.items():
        if len(runs) < 2:
            continue
        small, big = min(runs, key=lambda r: r["images"]), max(runs, key=lambda r: r["images"])
        a, b = small["steady_rows_per_s"] / small["ideal"], big["steady_rows_per_s"] / big["ideal"]
        sizes = f"{small['images']:,} -> {big['images']:,}"
        line(b >= a * GOAL, f"{rate:.0%}: ratio to ideal {a:.0%} -> {b:.0%} from {sizes} images",
             "a longer run falls further behind")  # fmt: skip
        m = big["peak_ray_mib"] / small["peak_ray_mib"]
        line(m <= 1.25, f"{rate:.0%}: Ray's peak memory x{m:.2f} from {sizes} images",
             "memory grows with the input")  # fmt: skip
    for r in results:
        if r["autoscale"]:
            grew = [p for p, f in r["pools"].items() if max(f["over_time"]) > 1]
            line(grew == [r["bottleneck"]] or (r["bottleneck"] in grew and len(grew) == 1),
                 f"autoscaling @ {r['flag_rate']:.0%}: pools that grew: {', '.join(grew) or 'none'} "
                 f"(bottleneck {r['bottleneck']})",
                 "other pools grew too, or the bottleneck did not")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000, help="images per run (default 2000)")
    parser.add_argument("--scale-up", type=int, default=0, metavar="K",
                        help="also run K x --images at each flag rate (the 'ratio holds' goal)")  # fmt: skip
    parser.add_argument(
        "--flag-rates", default="0.05,0.25,0.6", help="stand-in flag rates (default 0.05,0.25,0.6)"
    )
    parser.add_argument("--autoscale", action="store_true", help="also run pools [1, --gpus] at 25%% flags")
    parser.add_argument(
        "--gpus", type=int, default=8, help="GPUs the cluster declares and the plan splits (8)"
    )
    parser.add_argument("--stage1-gpu", default="H100", help="card of the stage-1 pools (H100)")
    parser.add_argument("--edit-gpu", default="L40S", help="card of the edit pool (L40S)")
    parser.add_argument("--rows-per-s", type=float, default=20.0,
                        help="ideal job rows/s the simulated GPUs are slowed to (20)")  # fmt: skip
    parser.add_argument(
        "--step-s", type=float, default=0.05, help="engine step of the vLLM stand-ins (0.05 s)"
    )
    parser.add_argument("--object-store-mib", type=int, default=1024, help="Ray object store (1024 MiB)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--json", help="write every run's figures here")
    parser.add_argument("--compare", action="append", default=[], metavar="JSON",
                        help="an earlier --json whose runs join the goals")  # fmt: skip
    parser.add_argument(
        "--cpu-json", help="write the CPU-seconds per row (25%% flags, largest run) for u2s plan"
    )
    parser.add_argument("--verbose", action="store_true", help="Ray workers' logs on the driver")
    args = parser.parse_args()

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    rates = [float(x) for x in args.flag_rates.split(",")]
    counts = [args.images] + ([args.images * args.scale_up] if args.scale_up > 1 else [])
    info = machine_info(("ray", "pyarrow", "pillow", "moto"))
    print(f"machine: {info}")
    server, endpoint = start_s3()
    args.s3_pid = server.pid
    results = []
    try:
        cache = Path(tempfile.gettempdir()) / "u2s-sim-images"
        for n in counts:
            make_images(cache, n)
            upload(endpoint, cache, f"images-{n}", n)
        runs = [(n, rate, False) for n in counts for rate in rates]
        if args.autoscale:
            runs.append((args.images, 0.25, True))
        for n, rate, autoscale in runs:
            r = simulate(args, endpoint, n, rate, autoscale)
            results.append(r)
            print("\n".join(report(r)), flush=True)
            if args.json:  # after every run: a long session keeps what it measured
                Path(args.json).write_text(json.dumps({"info": info, "runs": results}, indent=2, default=str))
    finally:
        server.terminate()
    earlier = [r for path in args.compare for r in json.loads(Path(path).read_text())["runs"]]
    print("\n".join(goals(earlier + results)))
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "runs": results}, indent=2, default=str) + "\n")
    if args.cpu_json:
        pick = [r for r in results if abs(r["flag_rate"] - 0.25) < 1e-9 and not r["autoscale"]] or results
        best = max(pick, key=lambda r: r["images"])
        source = (f"bench/cluster_sim.py, {best['images']:,} COCO-like JPEGs, {best['flag_rate']:.0%} flags, "
                  f"{info['cores']} cores ({info['cpu']})")  # fmt: skip
        Path(args.cpu_json).write_text(
            json.dumps({"cpu_seconds_per_row": best["cpu_s_per_row"], "source": source}) + "\n"
        )


if __name__ == "__main__":
    main()

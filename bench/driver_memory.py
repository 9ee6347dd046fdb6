"""The driver's peak memory over a whole ``u2s.pipeline.run``, at N and 10 N rows.

Each size runs in a fresh process (so its ``ru_maxrss`` is its own): N tiny PNGs (8×8) in a folder, the
cpu-tiny preset with stage 1 on the HTTP engine against an instant stand-in server in a process of its
own (:class:`u2s.testing.chat_server.OracleChatServer` answering "nothing private" to every call, so no
model runs and every row is kept), the whole job otherwise as it is: listing, fetch, decode, the pools,
the sinks, the exactly-once check, the run records. Prints each run's wall time and the driver's peak
RSS (``ru_maxrss`` and a 0.2 s psutil sample), and their ratio (the bar: ≤ 1.2).

    python bench/driver_memory.py                     # 10 000 and 100 000 rows
    python bench/driver_memory.py --rows 5000 --json out.json
    python bench/driver_memory.py --batch 64          # blocks of 64 rows, as a large run sets them
    python bench/driver_memory.py --outputs-only      # the driver's end of a run alone (below)

``--outputs-only`` measures just what the driver does with finished outputs, where it grew with the rows
before: N rows are written to both tables (the sink, in 1 000-row write tasks, no model), then a fresh
process on its own local Ray runs ``--resume``'s reconcile and the exactly-once check
(``u2s.pipeline.verify_outputs``) on them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, markdown_table

REPO = Path(__file__).resolve().parents[1]


def write_images(folder: Path, n: int) -> None:
    """``n`` distinct 8×8 PNGs (distinct bytes: one pixel carries the index)."""
    from PIL import Image

    for i in range(n):
        image = Image.new("RGB", (8, 8), (i % 251, (i // 251) % 251, 7))
        image.save(folder / f"{i:06d}.png")


def start_ray(tries: int = 5) -> None:
    """A local Ray of 2 CPUs; on a loaded machine its start can time out, so it is tried again."""
    import ray

    from u2s.pipeline import init_ray

    for attempt in range(tries):
        try:
            init_ray(num_cpus=2)
            return
        except Exception:
            ray.shutdown()
            if attempt == tries - 1:
                raise
            time.sleep(10)


def serve(url_file: str) -> None:
    """The instant stand-in server, in its own process (its memory is not the driver's)."""
    from u2s.testing.chat_server import OracleChatServer

    with OracleChatServer(lambda request: {"privacy_flag": False, "categories": []}) as url:
        Path(url_file).write_text(url)
        threading.Event().wait()


@contextmanager
def stand_in_server():
    """Start :func:`serve` in a child process; yields its URL."""
    with tempfile.TemporaryDirectory() as tmp:
        url_file = Path(tmp, "url")
        proc = subprocess.Popen([sys.executable, __file__, "--serve", str(url_file)], cwd=REPO)
        try:
            while not url_file.exists() or not url_file.read_text():
                if proc.poll() is not None:
                    raise SystemExit("the stand-in server did not start")
                time.sleep(0.2)
            yield url_file.read_text()
        finally:
            proc.kill()
            proc.wait()


def child(folder: str, out: str, batch: str) -> dict:
    """One run in this process (``batch``: rows per block of every stage); returns its wall time and this
    process's peak RSS."""
    import psutil

    from u2s.config import load_config
    from u2s.pipeline import run

    peak = {"rss": 0}
    stop = threading.Event()

    def sample() -> None:
        me = psutil.Process()
        while not stop.is_set():
            peak["rss"] = max(peak["rss"], me.memory_info().rss)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with stand_in_server() as url:
        cfg = load_config(preset="cpu-tiny", overrides=[
            f"input.uri={folder}", f"output.uri={out}/safe", f"output.sensitive_uri={out}/sensitive",
            "stage1.engine=http",
            f"stage1.http={{base_url: '{url}', api_key_env: null, max_concurrency: 16}}",
            "stage1.vlm.model=stand-in-vlm", "stage1.llm.model=stand-in-llm", "stage2.editor=blur",
            f"ray.decode.batch_size={batch}", f"stage1.calls.inspect.resources.batch_size={batch}",
            f"stage1.calls.instruct.resources.batch_size={batch}", f"stage2.resources.batch_size={batch}",
        ])  # fmt: skip
        start_ray()
        start = time.perf_counter()
        summary = run(cfg)
        wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    return {
        "rows": summary.rows,
        "kept": summary.by_status.get("kept", 0),
        "wall_s": round(wall, 1),
        "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "sampled_peak_rss_mib": round(peak["rss"] / 2**20, 1),
    }


def write_outputs(out: Path, n: int) -> str:
    """``n`` finished rows in both tables (as a run leaves them); returns the listing's fingerprint."""
    from ray.data._internal.planner.plan_write_op import WRITE_UUID_KWARG_NAME

    from u2s.config import OutputConfig, StorageConfig
    from u2s.io.listing import _fingerprint
    from u2s.io.writers import SafeAndSensitiveDatasink
    from u2s.schema import new_row, rows_to_table

    output = OutputConfig(uri=str(out / "safe"), sensitive_uri=str(out / "sensitive"))
    (out / "safe").mkdir(parents=True)
    (out / "sensitive").mkdir()
    sink = SafeAndSensitiveDatasink(output, StorageConfig())
    ids, sources = [f"{i:020x}" for i in range(n)], [f"/images/{i:06d}.png" for i in range(n)]
    for task, start in enumerate(range(0, n, 1000)):
        rows = [new_row(ids[i], sources[i], None, b"png") for i in range(start, min(n, start + 1000))]
        for row in rows:
            row.update(status="kept", privacy_flag=False, timings={"inspect": 0.01})
        context = type("Ctx", (), {"task_idx": task, "kwargs": {WRITE_UUID_KWARG_NAME: "bench"}})()
        sink.write([rows_to_table(rows)], context)
    return f"{n}:{_fingerprint(ids, sources):016x}"


def outputs_child(out: str, n: str, fingerprint: str) -> dict:
    """reconcile + verify_outputs on written outputs, in this process; its peak RSS."""
    from u2s.config import load_config
    from u2s.pipeline import verify_outputs
    from u2s.resume import reconcile

    cfg = load_config(preset="cpu-tiny", overrides=[
        f"input.uri={out}", f"output.uri={out}/safe", f"output.sensitive_uri={out}/sensitive",
    ])  # fmt: skip
    start_ray()
    start = time.perf_counter()
    done = reconcile(cfg.output, cfg.storage).done
    counts = verify_outputs(cfg, int(n), fingerprint)
    return {
        "rows": counts["rows"], "resumable": len(done), "wall_s": round(time.perf_counter() - start, 1),
        "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "sampled_peak_rss_mib": 0.0,
    }  # fmt: skip


def measure_outputs(n: int) -> dict:
    """Write ``n`` rows' outputs, then reconcile and verify them in a fresh process."""
    with tempfile.TemporaryDirectory(prefix="u2s-driver-mem-") as tmp:
        fingerprint = write_outputs(Path(tmp), n)
        return _run_child(["--outputs-child", tmp, str(n), fingerprint], n)


def _run_child(arguments: list[str], n: int) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, *arguments],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"the run on {n} rows failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(n: int, batch: int) -> dict:
    """Write ``n`` images and run the job on them in a fresh process."""
    with tempfile.TemporaryDirectory(prefix="u2s-driver-mem-") as tmp:
        folder = Path(tmp, "images")
        folder.mkdir()
        write_images(folder, n)
        return _run_child(["--child", str(folder), str(Path(tmp, "out")), str(batch)], n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000, help="N: runs N and 10 N rows")
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--outputs-only", action="store_true", help="the driver's end of a run alone")
    parser.add_argument(
        "--batch",
        type=int,
        default=4,
        help="rows per block in every stage of a whole run (cpu-tiny: 4; paper's decode: 64)",
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--outputs-child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    if args.outputs_child:
        print(json.dumps(outputs_child(*args.outputs_child)))
        return
    run_one = measure_outputs if args.outputs_only else partial(measure, batch=args.batch)
    results = [run_one(args.rows), run_one(10 * args.rows)]
    ratio = results[1]["ru_maxrss_mib"] / results[0]["ru_maxrss_mib"]
    rows = [[str(r["rows"]), str(r["wall_s"]), str(r["ru_maxrss_mib"]), str(r["sampled_peak_rss_mib"])]
            for r in results]  # fmt: skip
    print(markdown_table(["rows", "wall s", "driver ru_maxrss MiB", "driver sampled peak MiB"], rows))
    print(f"driver peak at {10 * args.rows} / at {args.rows} rows: {ratio:.2f} (bar: <= 1.2)")
    if args.json:
        record = {"machine": machine_info(("ray", "pyarrow")), "runs": results, "ratio": round(ratio, 3)}
        Path(args.json).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()

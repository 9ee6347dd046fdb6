"""Driver memory as the input grows: list N files and read them through fetch + decode, for N and 10 N.

Each size runs in a fresh driver process (its own local Ray cluster) that lists a folder of N tiny PNG
files in Ray tasks (``u2s.io.listing.list_input``), fetches and decodes every row in Ray tasks and counts
them; the parent reports the driver's peak RSS (``ru_maxrss``) and the time. The listing and the rows
live in Ray's object store and workers, so the driver should stay flat: the issue's bar is a peak RSS at
10 N within 1.2× of that at N.

``--flat`` lists flat inputs instead (listing only, no fetch): one local folder of 10 000 and of
200 000 files, and an S3 prefix (a local moto server) of 2 000 and of 20 000 keys, each in a fresh
driver; it reports the driver's peak RSS and the listing's wall time beside one sequential ``fs.find``
of the same root (timed in another process, so that its memory is not the driver's).

    python bench/listing.py                      # 10 000 vs 100 000 files (~3 min on 2 cores)
    python bench/listing.py --files 2000 --json out.json
    python bench/listing.py --flat --json flat.json   # flat folder and S3 prefix (~10 min on 2 cores)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, markdown_table


def write_files(folder: Path, n: int) -> None:
    """``n`` 8×8 PNGs in 100 subfolders (a listing shard each); ids come from the paths."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, "PNG")
    data = buf.getvalue()
    for i in range(n):
        sub = folder / f"d{i % 100:02d}"
        sub.mkdir(exist_ok=True)
        (sub / f"{i:07d}.png").write_bytes(data)


def write_flat(folder: Path, n: int) -> None:
    """``n`` empty ``.png`` files in one folder (listing reads names, not bytes)."""
    for i in range(n):
        (folder / f"{i:07d}.png").touch()


def upload_flat(endpoint: str, bucket: str, n: int) -> None:
    """``n`` one-byte ``.png`` keys under ``bucket/flat/`` on the S3 server (16 threads)."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket=bucket)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: s3.put_object(Bucket=bucket, Key=f"flat/{i:07d}.png", Body=b"x"), range(n)))


def flat_driver(uri: str, endpoint: str | None) -> None:
    """The measured driver of ``--flat``: list ``uri`` in Ray tasks, count; print JSON figures."""
    import os

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from u2s.config import InputConfig, Resources, StorageConfig
    from u2s.io.ids import IdKey
    from u2s.io.listing import list_input

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=512 * 2**20, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    start = time.perf_counter()
    storage = StorageConfig(endpoint_url=endpoint)
    listing = list_input(InputConfig(uri=uri), storage, Resources(num_cpus=0.5), IdKey.generate())
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"listed": listing.rows, "tables": listing.shards, "list_s": seconds,
                      "driver_peak_mib": peak}))  # fmt: skip


def find_driver(uri: str, endpoint: str | None) -> None:
    """One sequential ``fs.find`` of ``uri`` (the listing a single task or the driver would do)."""
    from u2s.config import StorageConfig
    from u2s.io.storage import filesystem

    fs, root = filesystem(uri, StorageConfig(endpoint_url=endpoint))
    start = time.perf_counter()
    found = len(fs.find(root))
    print(json.dumps({"found": found, "find_s": time.perf_counter() - start}))


def _child(*args: str) -> dict:
    for _ in range(3):  # Ray gives a node 30 s to register: a busy machine can miss it
        done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
        if "timed out during startup" not in done.stderr:
            break
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def flat(json_out: str | None, inputs: tuple[str, ...] = ("local", "s3")) -> None:
    """The ``--flat`` runs: a local folder and an S3 prefix, each at N and at 10 N or more."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    info = machine_info(("ray", "pyarrow", "s3fs", "moto"))
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_port}"
    results = []
    try:
        for where, n in (("local", 10_000), ("local", 200_000), ("s3", 2_000), ("s3", 20_000)):
            if where not in inputs:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                if where == "local":
                    write_flat(Path(tmp), n)
                    uri = tmp
                else:
                    bucket = f"flat-{n}"
                    upload_flat(endpoint, bucket, n)
                    uri = f"s3://{bucket}/flat"
                figures = _child("--flat-driver", uri, "--endpoint", endpoint)
                found = _child("--find-driver", uri, "--endpoint", endpoint)
            assert figures["listed"] == found["found"] == n, (figures, found)
            results.append({"input": where, "files": n, **figures, **found})
            print(f"{where} {n} files: driver peak {figures['driver_peak_mib']:.0f} MiB, listing "
                  f"{figures['list_s']:.1f} s in {figures['tables']} tables, one find "
                  f"{found['find_s']:.1f} s", flush=True)  # fmt: skip
    finally:
        server.stop()
    cells = [[r["input"], f"{r['files']:,}", str(r["tables"]), f"{r['driver_peak_mib']:.0f}",
              f"{r['list_s']:.1f}", f"{r['find_s']:.1f}"] for r in results]  # fmt: skip
    print()
    print(markdown_table(["input", "files", "tables", "driver peak RSS (MiB)", "listing (s)", "one find (s)"],
                         cells))  # fmt: skip
    ratios = {}
    for where in inputs:
        small, big = (r for r in results if r["input"] == where)
        ratios[where] = big["driver_peak_mib"] / small["driver_peak_mib"]
        print(f"{where}: driver peak RSS at {big['files']:,} / at {small['files']:,}: {ratios[where]:.2f}x"
              "  (bar: <= 1.2x)")  # fmt: skip
    print(f"machine: {info}")
    if json_out:
        Path(json_out).write_text(
            json.dumps({"info": info, "runs": results, "ratios": ratios}, indent=2) + "\n"
        )


def driver(folder: str) -> None:
    """The measured driver: list, fetch + decode in Ray tasks, count; print JSON figures."""
    import os

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from u2s.config import DecodeConfig, InputConfig, Resources, StorageConfig
    from u2s.io.decode_stage import DecodeStage
    from u2s.io.ids import IdKey
    from u2s.io.listing import list_input
    from u2s.io.readers import fetch

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=512 * 2**20, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    start = time.perf_counter()
    cfg, storage, resources = (
        InputConfig(uri=folder),
        StorageConfig(),
        Resources(batch_size=256, num_cpus=0.5),
    )
    listing = list_input(cfg, storage, resources, IdKey.generate())  # keyed ids, as a run makes them
    listed = time.perf_counter() - start
    stage = DecodeStage(DecodeConfig(), thumbnail_side=8, metadata="keep")
    rows = fetch(listing.dataset, cfg, storage, resources).map_batches(
        lambda batch: stage(batch).select(["id", "status"]),
        batch_format="pyarrow",
        batch_size=256,
        num_cpus=0.5,
    )
    count = rows.count()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux → MiB
    print(json.dumps({"rows": count, "listed": listing.rows, "list_s": listed, "seconds": seconds,
                      "driver_peak_mib": peak}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10_000, help="N (the second run lists 10 N)")
    parser.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    parser.add_argument("--flat", action="store_true", help="flat local folder and S3 prefix, listing only")
    parser.add_argument("--inputs", default="local,s3", help="with --flat: local, s3 or both (local,s3)")
    parser.add_argument("--driver", metavar="FOLDER", help=argparse.SUPPRESS)
    parser.add_argument("--flat-driver", metavar="URI", help=argparse.SUPPRESS)
    parser.add_argument("--find-driver", metavar="URI", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.driver:
        driver(args.driver)
        return
    if args.flat_driver or args.find_driver:
        (flat_driver if args.flat_driver else find_driver)(
            args.flat_driver or args.find_driver, args.endpoint
        )
        return
    if args.flat:
        flat(args.json, tuple(args.inputs.split(",")))
        return
    info = machine_info(("ray", "pyarrow"))
    results = []
    for n in (args.files, 10 * args.files):
        with tempfile.TemporaryDirectory() as tmp:
            write_files(Path(tmp), n)
            done = subprocess.run([sys.executable, __file__, "--driver", tmp], capture_output=True, text=True)
            if done.returncode:
                sys.exit(done.stderr[-3000:])
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            assert figures["rows"] == n, figures
            results.append({"files": n, **figures})
            print(f"{n} files: driver peak {figures['driver_peak_mib']:.0f} MiB, {figures['seconds']:.1f} s",
                  flush=True)  # fmt: skip
    cells = [[f"{r['files']:,}", f"{r['driver_peak_mib']:.0f}", f"{r['list_s']:.1f}", f"{r['seconds']:.1f}"]
             for r in results]  # fmt: skip
    print()
    print(
        markdown_table(["files", "driver peak RSS (MiB)", "listing (s)", "list + fetch + decode (s)"], cells)
    )
    ratio = results[1]["driver_peak_mib"] / results[0]["driver_peak_mib"]
    print(f"\ndriver peak RSS at 10 N / at N: {ratio:.2f}x  (bar: <= 1.2x); machine: {info}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"info": info, "runs": results, "ratio": ratio}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()

"""Driver memory as the input grows: list N files and read them through fetch + decode, for N and 10 N.

Each size runs in a fresh driver process (its own local Ray cluster) that lists a folder of N tiny PNG
files in Ray tasks (``u2s.io.listing.list_input``), fetches and decodes every row in Ray tasks and counts
them; the parent reports the driver's peak RSS (``ru_maxrss``) and the time. The listing and the rows
live in Ray's object store and workers, so the driver should stay flat: the issue's bar is a peak RSS at
10 N within 1.2× of that at N.

    python bench/listing.py                      # 10 000 vs 100 000 files (~3 min on 2 cores)
    python bench/listing.py --files 2000 --json out.json
"""

from __future__ import annotations

import argparse
import io
import json
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


def driver(folder: str) -> None:
    """The measured driver: list, fetch + decode in Ray tasks, count; print JSON figures."""
    import os

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from u2s.config import DecodeConfig, InputConfig, Resources, StorageConfig
    from u2s.io.decode import DecodeStage
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
    parser.add_argument("--driver", metavar="FOLDER", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.driver:
        driver(args.driver)
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

"""CPU work per image outside the models, on one core: what one GPU's worth of images costs the CPUs.

A script that prints figures, not a test. Every image is fetched, decoded, stripped of its metadata,
thumbnailed for the VLM and written; a flagged one is also decoded in stage 2 at the editor's working
size, resized back and encoded. This script times each of those steps with u2s's own functions, pinned
to one core (``os.sched_setaffinity``, one thread for numpy and Pillow), on photo-like JPEGs (real
photographs resized, plus sensor-like noise, saved at quality 90 with EXIF, GPS, XMP and a comment) at
two sizes: 640×480 (COCO) and 4032×3024 (12 MP phone photo). Per size it prints, in ms per image
(CPU time of the process, fastest of ``--repeat`` passes of the mean over ``--images`` images):

* the physical reference: Pillow's plain libjpeg-turbo decode (and its MP/s), and the same at 1/8 DCT
  scale;
* fetch (a local file through u2s's fsspec reader, into a working row);
* decode: the full decode (``decode_image`` as stage 2 used to), the VLM thumbnail the old way (full
  decode, resize, JPEG encode) and u2s's (decode reduced at a DCT scale, resize, encode);
* the metadata strip (``strip_metadata``: marker walk, no decode);
* the decode stage as the pipeline runs it (``DecodeStage`` on an Arrow batch: all of the above and the
  Arrow ↔ row conversion), and that conversion alone for a stage shaped like the decode stage and like a
  stage-1 call;
* the stage-1 actor's thumbnail load (JPEG → PIL) and the Parquet write of the row (zstd);
* for a flagged image: stage 2's decode at the working size (full vs DCT-scaled), the resize of the
  edited image back to the original size and its encode (JPEG q95);

then the totals for a kept and for a flagged image, and the cores one GPU needs at given GPU rates
(defaults: ``u2s plan``'s estimates for the paper preset on an H100, 24.2 images/s through the VLM and
1.09 images/s through InstructPix2Pix). The VLM's own image preprocessing in its actor (vLLM's processor)
is the model's work and not counted here::

    python bench/cpu_per_image.py                       # about a minute of CPU time
    python bench/cpu_per_image.py --repeat 5 --json cpu.json --vlm-rate 40 --edit-rate 2
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy loads
    os.environ[_var] = "1"

import argparse  # noqa: E402
import io  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, ClassVar  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/cpu_per_image.py` from a checkout, u2s installed or not
    sys.path.insert(0, str(REPO))

from _common import fmt, machine_info, markdown_table  # noqa: E402  (bench/ is on sys.path as a script)

from u2s.config import DecodeConfig, StorageConfig  # noqa: E402
from u2s.io.decode import decode_image, fit, load_rgb, thumbnail, thumbnail_size  # noqa: E402
from u2s.io.decode_stage import DecodeStage  # noqa: E402
from u2s.io.metadata import strip_metadata  # noqa: E402
from u2s.io.readers import fetch_bytes, working_table  # noqa: E402
from u2s.io.writers import finalize, safe_projection  # noqa: E402
from u2s.schema import SAFE_SCHEMA, WORKING_SCHEMA  # noqa: E402
from u2s.stage import Stage  # noqa: E402
from u2s.stage1.rows import load_thumbnails  # noqa: E402
from u2s.stage2.runner import encode_image  # noqa: E402
from u2s.testing.leak_corpus import photo  # noqa: E402

SIZES = {"coco": (640, 480), "12mp": (4032, 3024)}
PHOTOS = ("china", "astronaut", "coffee", "chelsea")
THUMBNAIL_SIDE = 448  # stage1.image_size's default
WORKING_SIDE = 512  # stage2.resolution's default (InstructPix2Pix, the paper's editor)


def photo_like(name: str, size: tuple[int, int], seed: int) -> bytes:
    """A real photograph cropped to ``size``'s aspect and resized to it, with sensor-like noise (luma
    σ 6, chroma σ 3: a phone photo's entropy), as a quality-90 JPEG carrying EXIF with GPS, XMP and a
    comment."""
    base = photo(name).convert("RGB")
    width, height = base.size
    aspect = size[0] / size[1]
    crop = (width, round(width / aspect)) if width / height < aspect else (round(height * aspect), height)
    left, top = (width - crop[0]) // 2, (height - crop[1]) // 2
    base = base.crop((left, top, left + crop[0], top + crop[1])).resize(size, Image.Resampling.BICUBIC)
    rng = np.random.default_rng(seed)
    noisy = np.asarray(base, np.float32) + rng.normal(0, 6, (size[1], size[0], 1))
    noisy += rng.normal(0, 3, (size[1], size[0], 3))
    img = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0132] = "Phone maker", "Phone model", "2026:12:07 12:00:00"
    exif.get_ifd(0x8825).update({1: "N", 2: (52.0, 31.0, 12.0), 3: "E", 4: (13.0, 24.0, 18.0)})
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta>'
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, exif=exif, xmp=xmp, comment=b"owner: someone")
    return buf.getvalue()


def best_ms(run: Callable[[], Any], items: int, repeat: int) -> float:
    """Fastest of ``repeat`` passes of ``run`` (which handles ``items`` images), in CPU-ms per image.

    CPU time of the process (every thread, all on the pinned core), not wall time: other processes on
    a shared machine slow the wall clock, not this process's CPU seconds."""
    times = []
    for _ in range(repeat):
        start = time.process_time()
        run()
        times.append(time.process_time() - start)
    return min(times) / items * 1e3


class _Noop(Stage):
    """A stage that does nothing: what remains is :class:`~u2s.stage.Stage`'s Arrow ↔ row conversion."""

    name = "noop"
    reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, reads: tuple[str, ...], writes: tuple[str, ...]) -> None:
        self.reads, self.writes = reads, writes

    def process(self, rows: list[dict]) -> None:
        pass


#: A stage-1 call's columns (the VLM's inspect call: the thumbnail and label in, the verdict out).
STAGE1_READS = ("thumbnail", "label", "frame_thumbnails")
STAGE1_WRITES = ("privacy_flag", "categories", "public_caption", "private_caption")
#: The editor's columns (stage 2: the image, its size and the texts in; the edited image out).
STAGE2_READS = ("image", "width", "height", "edit_instruction", "public_caption", "private_caption")
STAGE2_WRITES = ("image", "width", "height", "editor", "seed")


@dataclass
class Figures:
    """ms per image (one core) of each step at one size."""

    size: str
    width: int
    height: int
    jpeg_kib: float
    steps: dict[str, float] = field(default_factory=dict)
    libjpeg_mp_s: float = 0.0
    kept_ms: float = 0.0
    flagged_ms: float = 0.0
    thumbnail_diff: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def measure(name: str, size: tuple[int, int], images: int, repeat: int) -> Figures:
    files = [photo_like(PHOTOS[i % len(PHOTOS)], size, seed=i) for i in range(images)]
    fig = Figures(name, *size, jpeg_kib=sum(map(len, files)) / len(files) / 1024)
    n, steps = len(files), {}

    def each(fn: Callable[[bytes], Any]) -> Callable[[], None]:
        return lambda: [fn(data) for data in files]

    def time_step(label: str, fn: Callable[[bytes], Any]) -> None:
        steps[label] = best_ms(each(fn), n, repeat)

    time_step("libjpeg-turbo decode (reference)", lambda d: Image.open(io.BytesIO(d)).load())
    fig.libjpeg_mp_s = size[0] * size[1] / 1e6 / (steps["libjpeg-turbo decode (reference)"] / 1e3)

    def drafted(data: bytes) -> None:
        img = Image.open(io.BytesIO(data))
        img.draft(None, (size[0] // 8, size[1] // 8))
        img.load()

    time_step("libjpeg-turbo decode at 1/8 scale (reference)", drafted)

    with tempfile.TemporaryDirectory() as tmp:
        uris = []
        for i, data in enumerate(files):
            path = Path(tmp) / f"{i}.jpg"
            path.write_bytes(data)
            uris.append(path.as_uri())
        manifest = pa.table({"id": [str(i) for i in range(n)], "source": uris, "label": ["photo"] * n})
        storage = StorageConfig()

        def fetch() -> pa.Table:
            contents = fetch_bytes(uris, storage)
            return working_table(manifest, [bytes(c) for c in contents], [None] * n)

        steps["fetch (local file → working row)"] = best_ms(fetch, n, repeat)
        batch = fetch()

    time_step("full decode (decode_image)", decode_image)
    time_step(
        "thumbnail, old: full decode + resize + JPEG",
        lambda d: thumbnail(decode_image(d).image, THUMBNAIL_SIDE),
    )
    reduced = thumbnail_size(THUMBNAIL_SIDE)
    time_step(
        "thumbnail, now: DCT-scaled decode + resize + JPEG",
        lambda d: thumbnail(decode_image(d, size=reduced).image, THUMBNAIL_SIDE),
    )
    decoded = [decode_image(d, size=reduced) for d in files]
    steps["metadata strip (marker walk, no decode)"] = best_ms(
        lambda: [strip_metadata(d, decoded=dec) for d, dec in zip(files, decoded, strict=True)], n, repeat
    )
    diffs = []
    for data, dec in zip(files, decoded, strict=True):
        full = decode_image(data).image
        ref = full.resize(fit(*full.size, THUMBNAIL_SIDE), Image.Resampling.BICUBIC)
        diffs.append(np.abs(np.asarray(ref, np.int16) - np.asarray(dec.image, np.int16)).mean())
    fig.thumbnail_diff = float(np.mean(diffs))

    stage = DecodeStage(DecodeConfig(), THUMBNAIL_SIDE, "strip")
    steps["decode stage (Arrow batch in, out)"] = best_ms(lambda: stage(batch), n, repeat)
    done = stage(batch)
    conversion = _Noop(DecodeStage.reads, DecodeStage.writes)
    steps["  of which Arrow ↔ rows (decode-shaped)"] = best_ms(lambda: conversion(batch), n, repeat)
    stage1 = _Noop(STAGE1_READS, STAGE1_WRITES)
    steps["Arrow ↔ rows (stage-1-shaped stage)"] = best_ms(lambda: stage1(done), n, repeat)
    rows = done.select(["id", "thumbnail"]).to_pylist()
    steps["stage-1 thumbnail load (JPEG → PIL)"] = best_ms(
        lambda: [img.load() for img in load_thumbnails([dict(r) for r in rows], "inspect")[1]], n, repeat
    )
    kept = done.set_column(
        done.schema.get_field_index("status"), "status", pa.array(["kept"] * n, pa.string())
    )

    def write() -> None:
        table = safe_projection(finalize(kept.select(WORKING_SCHEMA.names)), SAFE_SCHEMA)
        writer = pq.ParquetWriter(io.BytesIO(), table.schema, compression="zstd")
        writer.write_table(table, row_group_size=n)
        writer.close()

    steps["Parquet write (safe table, zstd)"] = best_ms(write, n, repeat)

    published = [row["image"]["bytes"] for row in done.select(["image"]).to_pylist()]

    def working(width: int, height: int) -> tuple[int, int]:
        return fit(width, height, WORKING_SIDE)

    def stage2_old(data: bytes) -> Image.Image:
        img = load_rgb(data)
        return img.resize(working(*img.size), Image.Resampling.LANCZOS)

    lanczos = Image.Resampling.LANCZOS
    steps["stage 2 decode, old: full + resize"] = best_ms(
        lambda: [stage2_old(d) for d in published], n, repeat
    )
    steps["stage 2 decode, now: DCT-scaled + resize"] = best_ms(
        lambda: [load_rgb(d, size=working, resample=lanczos) for d in published], n, repeat
    )
    edited = [stage2_old(d) for d in published]
    steps["stage 2 resize back (Lanczos)"] = best_ms(
        lambda: [e.resize(size, lanczos) for e in edited], n, repeat
    )
    full_size = [e.resize(size, lanczos) for e in edited]
    steps["stage 2 encode (JPEG q95)"] = best_ms(
        lambda: [encode_image(f, "JPEG") for f in full_size], n, repeat
    )
    stage2 = _Noop(STAGE2_READS, STAGE2_WRITES)
    steps["Arrow ↔ rows (stage-2-shaped stage)"] = best_ms(lambda: stage2(done), n, repeat)
    fig.steps = steps
    kept_steps = ("fetch (local file → working row)", "decode stage (Arrow batch in, out)",
                  "Arrow ↔ rows (stage-1-shaped stage)", "stage-1 thumbnail load (JPEG → PIL)",
                  "Parquet write (safe table, zstd)")  # fmt: skip
    fig.kept_ms = sum(steps[s] for s in kept_steps)
    fig.flagged_ms = fig.kept_ms + sum(
        steps[s]
        for s in (
            "Arrow ↔ rows (stage-2-shaped stage)",
            "stage 2 decode, now: DCT-scaled + resize",
            "stage 2 resize back (Lanczos)",
            "stage 2 encode (JPEG q95)",
        )
    )
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="coco,12mp", help=f"comma-separated, of {sorted(SIZES)}")
    parser.add_argument("--images", type=int, default=8, help="distinct images per size")
    parser.add_argument("--repeat", type=int, default=3, help="passes per step (the fastest counts)")
    parser.add_argument(
        "--vlm-rate", type=float, default=24.2, help="images/s one GPU inspects (u2s plan, paper, H100)"
    )
    parser.add_argument(
        "--edit-rate", type=float, default=1.09, help="images/s one GPU edits (u2s plan, paper, H100)"
    )
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    info = machine_info(("pillow", "numpy", "pyarrow"))
    from PIL import features

    info.update(core=core, libjpeg_turbo=features.version("libjpeg_turbo"))
    print(f"one core (#{core}); {info}\n")
    results = [measure(name, SIZES[name], args.images, args.repeat) for name in args.sizes.split(",")]

    labels = list(results[0].steps)
    cells = [[label, *(fmt(r.steps[label], ".2f") for r in results)] for label in labels]
    cells.append(["libjpeg-turbo decode rate, MP/s", *(fmt(r.libjpeg_mp_s, ".0f") for r in results)])
    diff = "thumbnail vs full-decode thumbnail, mean abs diff (levels)"
    cells.append([diff, *(fmt(r.thumbnail_diff, ".2f") for r in results)])
    cells.append(["**total, kept image**", *(fmt(r.kept_ms, ".1f") for r in results)])
    cells.append(["**total, flagged image**", *(fmt(r.flagged_ms, ".1f") for r in results)])
    headers = [
        "ms per image, one core",
        *(f"{r.size} {r.width}×{r.height} ({r.jpeg_kib:.0f} KiB)" for r in results),
    ]
    print(markdown_table(headers, cells))

    print(f"\ncores per GPU: every image's work paced by a stage-1 GPU at {args.vlm_rate:g} images/s, a "
          f"flagged image's extra work by a stage-2 GPU at {args.edit_rate:g} images/s")  # fmt: skip
    for r in results:
        stage1 = args.vlm_rate * r.kept_ms / 1e3
        stage2 = args.edit_rate * (r.flagged_ms - r.kept_ms) / 1e3
        print(f"  {r.size}: {stage1:.2f} cores per stage-1 GPU, {stage2:.2f} per stage-2 GPU")
    if args.json:
        import json

        Path(args.json).write_text(
            json.dumps({"info": info, "sizes": [r.to_json() for r in results]}, indent=2) + "\n"
        )
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

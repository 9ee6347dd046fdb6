"""Encoding of edited images: bytes, encode/decode time and fidelity of PNG, WEBP and JPEG at original sizes.

A script that prints figures, not a test. An edited image leaves a diffusion editor at its working size
(``stage2.resolution``, 512 px long side; FlowEdit up to 1536) and the stage-2 runner resizes it back to
the row's original size (Lanczos) before encoding it with ``stage2.output_format``. This script
reproduces that: real photographs (scikit-image's astronaut, scikit-learn's china.jpg) are cropped to
4:3, resized to the working size the runner computes (``working_size``), then upscaled to typical
original sizes: 640×480 (COCO), 1024×768 and 4000×3000 (12 MP). Each is encoded as

* the runner's three formats, with the runner's own ``encode_image``: PNG (Pillow's default zlib level
  6, the current default), JPEG q95 (4:2:0 chroma) and WEBP q95 (lossy);
* PNG at zlib level 1, lossless WEBP at Pillow's default effort (quality 80, method 4) and at the
  fastest (quality 0, method 0), which the runner does not offer yet,

and the script prints, per size and format, the mean bytes per image and bits per pixel, the encode and
decode milliseconds (fastest of ``--repeat``), the PSNR of the lossy ones against the image encoded, and
what that means for the writer: rows in a 256 MiB Parquet file, and MiB held by a write task at the
default ``output.rows_per_file`` (1000)::

    python bench/encode.py                       # ~1 min on 2 cores (12 MP lossless WEBP dominates)
    python bench/encode.py --sizes 640x480,1024x768 --repeat 3 --json encode.json
"""

from __future__ import annotations

import argparse
import functools
import io
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/encode.py` from a checkout, u2s installed or not
    sys.path.insert(0, str(REPO))

from _common import fmt, machine_info, markdown_table  # noqa: E402  (bench/ is on sys.path as a script)

from u2s.stage2.runner import encode_image, working_size  # noqa: E402
from u2s.testing.leak_corpus import photo  # noqa: E402

#: name → (Pillow format, save options: None for the runner's encode_image, lossless)
FORMATS: dict[str, tuple[str, dict[str, Any] | None, bool]] = {
    "PNG": ("PNG", None, True),
    "JPEG q95": ("JPEG", None, False),
    "WEBP q95": ("WEBP", None, False),
    "PNG level 1": ("PNG", {"compress_level": 1}, True),
    "WEBP lossless": ("WEBP", {"lossless": True}, True),
    "WEBP lossless fast": ("WEBP", {"lossless": True, "quality": 0, "method": 0}, True),
}
PHOTOS = ("astronaut", "china")
ROWS_PER_FILE = 1000
FILE_BUDGET = 256 * 2**20


@dataclass
class Figure:
    size: str
    working: int
    format: str
    bytes: float
    bits_per_pixel: float
    encode_ms: float
    decode_ms: float
    psnr_db: float | None
    rows_per_256mib: int
    mib_per_1000_rows: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def crop_4_3(img: Image.Image) -> Image.Image:
    """The largest centred 4:3 (landscape) crop."""
    width, height = img.size
    if width * 3 > height * 4:
        new = height * 4 // 3
        return img.crop(((width - new) // 2, 0, (width - new) // 2 + new, height))
    new = width * 3 // 4
    return img.crop((0, (height - new) // 2, width, (height - new) // 2 + new))


def edited_like(name: str, size: tuple[int, int], resolution: int) -> Image.Image:
    """A photo as the runner hands it to the encoder: working size, then Lanczos back to ``size``."""
    img = crop_4_3(photo(name))
    work = working_size(size[0], size[1], resolution)
    return img.resize(work, Image.Resampling.LANCZOS).resize(size, Image.Resampling.LANCZOS)


def fastest(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    best, out = math.inf, None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best * 1000, out


def encode(img: Image.Image, name: str) -> bytes:
    pil_format, options, _ = FORMATS[name]
    if options is None:
        return encode_image(img, pil_format)[0]
    buf = io.BytesIO()
    img.save(buf, pil_format, **options)
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def measure(size: tuple[int, int], resolution: int, formats: list[str], repeat: int) -> list[Figure]:
    images = [edited_like(name, size, resolution) for name in PHOTOS]
    figures = []
    for name in formats:
        sizes, encode_ms, decode_ms, psnrs = [], [], [], []
        for img in images:
            ms, data = fastest(functools.partial(encode, img, name), repeat)
            encode_ms.append(ms)
            ms, pixels = fastest(functools.partial(decode, data), repeat)
            decode_ms.append(ms)
            sizes.append(len(data))
            original = np.asarray(img)
            if FORMATS[name][2] and not np.array_equal(pixels, original):
                raise AssertionError(f"{name} is not lossless")
            psnrs.append(psnr(pixels, original))
        mean_bytes = float(np.mean(sizes))
        figures.append(
            Figure(
                size=f"{size[0]}x{size[1]}",
                working=resolution,
                format=name,
                bytes=mean_bytes,
                bits_per_pixel=mean_bytes * 8 / (size[0] * size[1]),
                encode_ms=float(np.mean(encode_ms)),
                decode_ms=float(np.mean(decode_ms)),
                psnr_db=None if FORMATS[name][2] else float(np.mean(psnrs)),
                rows_per_256mib=int(FILE_BUDGET // mean_bytes),
                mib_per_1000_rows=mean_bytes * ROWS_PER_FILE / 2**20,
            )
        )
        print(f"  {figures[-1].size} from {resolution}: {name}: {mean_bytes / 1024:.0f} KiB", flush=True)
    return figures


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="640x480,1024x768,4000x3000", help="original sizes WxH")
    parser.add_argument("--resolution", type=int, default=512, help="working size (stage2.resolution)")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated names of FORMATS")
    parser.add_argument("--repeat", type=int, default=2, help="timings per figure; the fastest is kept")
    parser.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    formats = args.formats.split(",")
    unknown = set(formats) - set(FORMATS)
    if unknown:
        parser.error(f"unknown formats {sorted(unknown)}; known: {', '.join(FORMATS)}")

    info = machine_info(("pillow", "numpy"))
    info["libwebp"] = _libwebp()
    print(f"machine: {info}")
    figures: list[Figure] = []
    for text in args.sizes.split(","):
        size = parse_size(text)
        figures += measure(size, args.resolution, formats, args.repeat)

    headers = ["size", "from", "format", "KiB", "bits/px", "encode ms", "decode ms", "PSNR dB",
               "rows/256 MiB", "MiB/1000 rows"]  # fmt: skip
    cells = [
        [f.size, str(f.working), f.format, fmt(f.bytes / 1024, ".0f"), fmt(f.bits_per_pixel, ".2f"),
         fmt(f.encode_ms, ".0f"), fmt(f.decode_ms, ".0f"), fmt(f.psnr_db, ".1f"), str(f.rows_per_256mib),
         fmt(f.mib_per_1000_rows, ".0f")]
        for f in figures
    ]  # fmt: skip
    print()
    print(markdown_table(headers, cells))
    if args.json:
        from _common import write_json

        write_json(args.json, "cpu", info, "figures", figures)


def _libwebp() -> str | None:
    from PIL import features

    return features.version("webp")


if __name__ == "__main__":
    main()

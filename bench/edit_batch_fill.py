"""Editor batch fill: images per editor call at the paper preset's stage-2 batching, before and after.

A script that prints figures, not a test. A stream of synthetic rows (solid-colour PNGs in an assumed
COCO-like mix of native sizes, scaled down by ``--scale``: a size's working size depends on its ratio
only) is flagged at random at each flag rate and goes through the real :class:`~u2s.stage2.runner.EditStage`
Ray batch by Ray batch; the editor is InstructPix2Pix's class (its working sizes, bucketing and
``resolution``) with the model call replaced by a recording stand-in, registered with
:func:`~u2s.stage2.editors.register_editor`. Two configurations:

* before: Ray batches of 8 rows, calls of up to 8 images, each image at its own ratio (sides rounded to
  64 px) — the paper preset's stage 2 before ``max_batch`` and ``aspect_buckets``;
* after: the paper preset as it is (``resources.batch_size`` rows per Ray batch, ``max_batch``,
  ``aspect_buckets``).

It prints, per flag rate, the mean images per editor call, the fill (that over ``max_batch``), the
working sizes seen, and the fill :func:`~u2s.stage2.runner.mean_call_size` expects from the measured
shares of those sizes::

    python bench/edit_batch_fill.py                    # ~1 min on 2 cores
    python bench/edit_batch_fill.py --rows 20000 --rates 0.05,0.25,0.6
"""

from __future__ import annotations

import argparse
import io
import random
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _common import markdown_table  # noqa: E402

from u2s.config import Stage2Config, preset_text  # noqa: E402
from u2s.schema import new_row, rows_to_table  # noqa: E402
from u2s.stage2.editors import register_editor  # noqa: E402
from u2s.stage2.editors.base import Editor, EditorConfig  # noqa: E402
from u2s.stage2.editors.instruct_pix2pix import InstructPix2PixEditor  # noqa: E402
from u2s.stage2.runner import EditStage, mean_call_size  # noqa: E402

#: Assumed COCO-like native sizes and their shares (an approximation, not counted from COCO).
SIZES = {
    (640, 480): 0.42, (640, 427): 0.20, (480, 640): 0.12, (427, 640): 0.08, (500, 375): 0.05,
    (640, 360): 0.04, (612, 612): 0.04, (640, 512): 0.03, (375, 500): 0.02,
}  # fmt: skip


class RecordingEditor(InstructPix2PixEditor):
    """InstructPix2Pix's working sizes; no model: each call is recorded and the image inverted."""

    name = "bench_recording_ip2p"
    config_class = EditorConfig

    def __init__(self, stage2, storage=None) -> None:
        Editor.__init__(self, stage2, storage)
        self.config = stage2.section("instruct_pix2pix")
        self.calls: list[tuple[tuple[int, int], int]] = []

    def _edit(self, images, prompts, seeds):
        self.calls.append((images[0].size, len(images)))
        return [Image.fromarray(255 - np.asarray(img)) for img in images]


def stage2_config(before: bool) -> Stage2Config:
    """The paper preset's stage 2 with the recording editor; ``before``: its batching before full calls."""
    tree = yaml.safe_load(preset_text("paper"))["stage2"]
    tree.update(editor=RecordingEditor.name, verify={"checks": []})
    if before:
        tree.update(max_batch=None, aspect_buckets=None, resources={**tree["resources"], "batch_size": 8})
    return Stage2Config.model_validate(tree)


def stream(rows: int, rate: float, scale: float, seed: int) -> list[dict]:
    """``rows`` rows, each flagged with probability ``rate``, native sizes drawn from :data:`SIZES`."""
    rng = random.Random(seed)
    sizes, weights = list(SIZES), list(SIZES.values())
    pngs: dict[tuple[int, int], bytes] = {}
    out = []
    for i in range(rows):
        w, h = rng.choices(sizes, weights)[0]
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        if size not in pngs:
            buf = io.BytesIO()
            Image.new("RGB", size, (90, 120, 150)).save(buf, format="PNG")
            pngs[size] = buf.getvalue()
        row = new_row(f"r{i:06d}", f"src/{i}", "people", pngs[size])
        flagged = rng.random() < rate
        row.update(width=size[0], height=size[1], privacy_flag=flagged)
        if flagged:
            row.update(edit_instruction="change the face", public_caption="a person")
        out.append(row)
    return out


def measure(config: Stage2Config, rows: list[dict]) -> tuple[float, int, Counter]:
    """(mean images per call, calls, images per working size) for ``rows`` through the runner."""
    stage = EditStage(config)
    step = config.resources.batch_size
    for start in range(0, len(rows), step):
        stage(rows_to_table(rows[start : start + step]))
    calls = stage.editor.calls
    per_size: Counter = Counter()
    for size, n in calls:
        per_size[size] += n
    return sum(n for _, n in calls) / max(len(calls), 1), len(calls), per_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096, help="rows per flag rate")
    parser.add_argument("--rates", default="0.05,0.25,0.6", help="flag rates, comma-separated")
    parser.add_argument("--scale", type=float, default=0.2, help="native sizes scaled by this (cheaper)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic stream")
    args = parser.parse_args()
    register_editor(RecordingEditor)
    cells = []
    for rate in (float(r) for r in args.rates.split(",")):
        rows = stream(args.rows, rate, args.scale, args.seed)
        line = [f"{rate:.0%}"]
        for before in (True, False):
            config = stage2_config(before)
            cap = config.max_batch or config.resources.batch_size
            mean, calls, per_size = measure(config, rows)
            total = sum(per_size.values())
            shares = tuple(n / total for n in per_size.values()) if total else (1.0,)
            expected = mean_call_size(config.resources.batch_size, rate, cap, shares)
            line += [f"{config.resources.batch_size}/{cap}", f"{mean:.2f}", f"{mean / cap:.0%}",
                     f"{expected / cap:.0%}", str(len(per_size)), str(calls)]  # fmt: skip
        cells.append(line)
    headers = ["flagged"]
    for label in ("before", "after"):
        headers += [f"{label}: rows/cap", "images/call", "fill", "expected", "sizes", "calls"]
    print(f"{args.rows} rows per flag rate, assumed COCO-like size mix, IP2P working sizes at the paper's "
          "resolution (512); rows/cap: Ray batch rows / images per call at most")  # fmt: skip
    print(markdown_table(headers, cells))


if __name__ == "__main__":
    main()

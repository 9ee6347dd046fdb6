"""Validation during fine-tuning: the val split edited with the current weights, scored by the eval suite.

:func:`validate` runs on rank 0 every ``validate_every`` steps, with the EMA weights in place. It reports

- ``val_loss``: the denoising loss on the val rows under a fixed random stream (timesteps, noise; no
  dropout), so successive values compare;
- per metric of ``validation.metrics`` (FaceSim, TextSim, directional CLIP, SSIM...), ``val_<metric>``:
  the mean over the val rows where it is defined. Each val original (centre crop at ``resolution``) is
  edited through the editor users run: the weights are saved as a checkpoint is (``save_weights``) into
  a temporary folder, the editor is built from that folder through its config field
  (``stage2.<editor>.weights``) with a seed per row, and the eval
  suite's metric families (:mod:`u2s.eval.metrics`) score the edit against the original;
- ``val_ssim_target``: SSIM of the edit against the run's own edited image (how close the student gets
  to the editor that made the pairs).

The figures go to Ray Train's reported metrics and to ``<storage_path>/<name>/validation/report.json``
and ``report.html`` (a step → metric table; no caption, instruction, path or image: the val rows are
private). A resumed job rewrites the steps it validates again.
"""

from __future__ import annotations

import hashlib
import html
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

    from u2s.eval.metrics import MetricFamily, Score
    from u2s.finetune.config import FinetuneConfig

#: The train loop's rows → batch function: ``collate(rows, cfg, generator)`` (None: no augmentation).
Collate = Callable[[list[dict], "FinetuneConfig", Any], Any]

REPORT_DIR = "validation"
TARGET_METRIC = "ssim_target"

#: Metric families by their settings, loaded once per worker process (validation repeats every N steps).
_FAMILIES: dict[str, dict[str, MetricFamily]] = {}


def validate(
    model: Any, val_rows: list[dict], cfg: FinetuneConfig, step: int, collate: Collate
) -> dict[str, float]:
    """Figures of ``model`` (its current weights) on ``val_rows`` (pair rows, as the train loop reads
    them) at ``step``: ``val_loss`` and ``val_<metric>``; empty when there are no val rows. ``collate``
    turns rows into the model's batches (the train loop's). Also writes the validation report beside
    the checkpoints."""
    if not val_rows:
        return {}
    started = time.monotonic()
    figures = {"val_loss": val_loss(model, val_rows, cfg, collate)}
    skipped: dict[str, dict[str, int]] = {}
    if cfg.validation.edit:
        originals = [centre_crop(r["original"], cfg.resolution) for r in val_rows]
        edits = edit_rows(model, val_rows, originals, cfg)
        means, skipped = summarize(score(val_rows, originals, edits, cfg), metric_names(cfg))
        figures.update({f"val_{name}": value for name, value in means.items()})
    entry = {"step": step, "rows": len(val_rows), "figures": figures, "skipped": skipped,
             "seconds": round(time.monotonic() - started, 3)}  # fmt: skip
    write_report(cfg, entry)
    return figures


def val_loss(model: Any, val_rows: list[dict], cfg: FinetuneConfig, collate: Collate) -> float:
    """The mean denoising loss over ``val_rows``: centre crops, no dropout, a generator seeded by the seed."""
    import torch

    generator = torch.Generator().manual_seed(cfg.seed)
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(val_rows), cfg.batch_size):
            rows = val_rows[start : start + cfg.batch_size]
            batch = collate(rows, cfg, generator=None)
            total += float(model.loss(model.unet, batch, generator, dropout=False)) * len(rows)
    return total / len(val_rows)


def centre_crop(data: bytes, side: int) -> Image.Image:
    """An encoded image as the train loop sees it without augmentation: short side ``side``, centre crop."""
    import io

    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    return ImageOps.fit(img, (side, side), Image.Resampling.BICUBIC)


def editor_settings(model: Any, folder: Path) -> dict[str, Any]:
    """The editor's config fields that load the weights saved in ``folder`` (a checkpoint's layout)."""
    if hasattr(model, "editor_settings"):
        return model.editor_settings(folder)
    return {"weights": str(folder)}  # every editor loads a checkpoint folder through `weights`


def edit_rows(
    model: Any, rows: list[dict], originals: list[Image.Image], cfg: FinetuneConfig
) -> list[Image.Image]:
    """Edit ``originals`` with ``model``'s current weights through the editor ``cfg.editor`` (loaded from
    a temporary checkpoint folder by its config field), one seed per row id."""
    from u2s.config import Stage2Config
    from u2s.stage2.editors import load_editor
    from u2s.stage2.editors.base import EditPrompt

    assert cfg.model is not None
    with tempfile.TemporaryDirectory(prefix="u2s-val-") as tmp:
        folder = model.save_weights(Path(tmp))
        # The crops are edited at their own size (``edit`` never resizes), whatever the editor's resolution.
        section: dict[str, Any] = {
            "model": cfg.model.model_dump(mode="json"),
            **editor_settings(model, Path(folder)),
        }
        if cfg.validation.num_inference_steps is not None:
            section["num_inference_steps"] = cfg.validation.num_inference_steps
        editor = load_editor(
            Stage2Config.model_validate({"editor": cfg.editor, cfg.editor: section}), cfg.storage
        )
        prompts = [EditPrompt(str(r["edit_instruction"] or ""), str(r["public_caption"] or "")) for r in rows]
        seeds = [row_seed(cfg.seed, str(r["id"])) for r in rows]
        edits: list[Image.Image] = []
        for start in range(0, len(rows), cfg.batch_size):
            end = start + cfg.batch_size
            edits += editor.edit(originals[start:end], prompts[start:end], seeds[start:end])
    return edits


def row_seed(seed: int, row_id: str) -> int:
    """A row's 63-bit edit seed: the same at every validation, so the figures compare across steps."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{row_id}".encode()).digest()[:8], "big") >> 1


def metric_names(cfg: FinetuneConfig) -> list[str]:
    return [*cfg.validation.metrics, TARGET_METRIC]


def families(cfg: FinetuneConfig) -> dict[str, MetricFamily]:
    """The eval suite's metric families for ``validation.metrics``, built once per process."""
    from u2s.eval.config import EvalConfig
    from u2s.eval.metrics import families_of, family_class

    settings = cfg.validation
    key = settings.model_dump_json()
    if key not in _FAMILIES:
        eval_cfg = EvalConfig.model_construct(models=settings.models, metrics=list(settings.metrics))
        _FAMILIES[key] = {
            name: family_class(name)(eval_cfg, wanted)
            for name, wanted in families_of(settings.metrics).items()
        }
    return _FAMILIES[key]


def score(
    rows: list[dict], originals: list[Image.Image], edits: list[Image.Image], cfg: FinetuneConfig
) -> list[dict[str, Score]]:
    """Per row, ``{metric: score}`` of its edit against its original (and ``ssim_target`` against the
    run's edited image, centre-cropped alike)."""
    from u2s.eval.cheating import ssim
    from u2s.eval.metrics import Pair

    pairs = [
        Pair(
            id=f"val/{r['id']}",
            method="val",
            original=o,
            anonymized=e,
            public_caption=r.get("public_caption"),
            private_caption=r.get("private_caption"),
        )
        for r, o, e in zip(rows, originals, edits, strict=True)
    ]
    out: list[dict[str, Score]] = [{} for _ in pairs]
    for family in families(cfg).values():
        for scores, found in zip(out, family.score(pairs), strict=True):
            scores.update(found)
    for scores, row, edit in zip(out, rows, edits, strict=True):
        scores[TARGET_METRIC] = ssim(centre_crop(row["edited"], cfg.resolution), edit)
    return out


def summarize(
    scores: list[dict[str, Score]], metrics: list[str]
) -> tuple[dict[str, float], dict[str, dict[str, int]]]:
    """Per metric, the mean over the rows where it is defined, and its skip reasons with their counts."""
    from u2s.eval.metrics import Skip

    means: dict[str, float] = {}
    skipped: dict[str, dict[str, int]] = {}
    for name in metrics:
        found = [s[name] for s in scores if name in s]
        values = [float(v) for v in found if not isinstance(v, Skip)]
        reasons = Counter(v.reason for v in found if isinstance(v, Skip))
        if values:
            means[name] = sum(values) / len(values)
        if reasons:
            skipped[name] = dict(reasons)
    return means, skipped


# --------------------------------------------------------------------------------------------- report


def report_uri(cfg: FinetuneConfig, name: str) -> str:
    from u2s.io.storage import uri_join

    return uri_join(cfg.experiment_uri, REPORT_DIR, name)


def write_report(cfg: FinetuneConfig, entry: dict[str, Any]) -> None:
    """Add ``entry`` (one validation) to ``report.json`` (replacing entries from its step on: a resumed
    job validates those again) and rewrite ``report.html`` from it."""
    from u2s.io.storage import filesystem, read_json, write_json

    record = read_json(report_uri(cfg, "report.json"), cfg.storage) or {}
    steps = [e for e in record.get("steps", []) if e["step"] < entry["step"]] + [entry]
    record = {
        "experiment": cfg.name, "editor": cfg.editor, "method": cfg.method, "metrics": metric_names(cfg),
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"), "steps": steps,
    }  # fmt: skip
    write_json(report_uri(cfg, "report.json"), cfg.storage, record)
    fs, path = filesystem(report_uri(cfg, "report.html"), cfg.storage)
    with fs.open(path, "w") as f:
        f.write(render_html(record))


def _label(name: str) -> tuple[str, str]:
    """(label, arrow) of a reported figure."""
    from u2s.eval.metrics import METRICS

    if name == "loss":
        return "val loss", "↓"
    if name == TARGET_METRIC:
        return "SSIM to the run's edit", "↑"
    metric = METRICS[name]
    return metric.label, metric.arrow


def render_html(record: dict[str, Any]) -> str:
    """The report as one self-contained page: a step → figure table (mean over the val rows), skip
    reasons on hover. Holds no caption, instruction, path or image."""
    from u2s.eval.report import CSS

    names = ["loss", *record["metrics"]]
    head = "".join(f"<th>{html.escape(label)} {arrow}</th>" for label, arrow in (_label(n) for n in names))
    body = []
    for entry in record["steps"]:
        cells = []
        for name in names:
            value = entry["figures"].get(f"val_{name}")
            reasons = entry.get("skipped", {}).get(name, {})
            title = "; ".join(f"{reason}: {count}" for reason, count in reasons.items())
            text = "n/a" if value is None else f"{value:.4f}"
            extra = f' title="skipped: {html.escape(title)}"' if title else ""
            mark = "<sup>*</sup>" if title else ""
            cells.append(f"<td{extra}>{text}{mark}</td>")
        body.append(f"<tr><td class=name>{entry['step']}</td><td>{entry['rows']}</td>{''.join(cells)}</tr>")
    return (
        "<!doctype html><html><head><meta charset=utf-8><title>u2s finetune validation</title>"
        f"<style>{CSS}</style></head><body>"
        f"<h1>Validation: {html.escape(record['experiment'])}</h1>"
        f"<p class=muted>editor {html.escape(record['editor'])} ({html.escape(record['method'])}); "
        f"updated {html.escape(record['updated'])}. Means over the val rows edited with the weights (EMA "
        "when on) at each step; ↑/↓: which way is better; <sup>*</sup>: some rows skipped (hover: why).</p>"
        f"<table><thead><tr><th class=name>step</th><th>rows</th>{head}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table></body></html>"
    )

"""``report.html``: one self-contained page (no external files) a person opens to compare methods.

- a table of every metric per method: mean, 95% CI, n, skipped (reasons on hover), with direction
  arrows and the best method per metric in bold, grouped Quality / Cheating / Privacy;
- row counts per method (kept, edited, error, not scored, missing);
- one matplotlib plot per metric: its distribution per method (box plot + points), as a base64 PNG;
- a before / after grid per method of sampled rows (flagged rows first) as base64 JPEGs, with each row's
  scores. Public captions and edit instructions appear only when ``private_text`` is set (the report
  is then written on the sensitive side); otherwise the page holds no caption, instruction or path.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

GROUPS = (("quality", "Quality"), ("cheating", "Cheating"), ("privacy", "Privacy"))

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d232a;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #dde3ea}
h3{font-size:15px;margin:18px 0 6px}.muted{color:#5b6773;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:6px 0}th,td{border:1px solid #dde3ea;padding:4px 8px;
text-align:right;vertical-align:top}th{background:#f3f6f9}td.name,th.name{text-align:left}
td.best{font-weight:700;background:#eef8ee}.ci{color:#5b6773;font-size:11px}.skip{color:#a15c00}
.group td{background:#f9fafb;text-align:left;font-weight:600}
.plots{display:flex;flex-wrap:wrap;gap:12px}.plots img{border:1px solid #dde3ea;max-width:100%}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:14px}
.card{border:1px solid #dde3ea;border-radius:6px;padding:8px}.pair{display:flex;gap:6px}
.pair figure{margin:0;flex:1;text-align:center}.pair img{max-width:100%;height:auto;background:#eee}
figcaption{font-size:11px;color:#5b6773}.scores{font-size:11px;margin-top:4px}
.text{font-size:12px;margin:4px 0}
.flag{display:inline-block;font-size:11px;padding:0 6px;border-radius:8px;background:#fde8e8;color:#8a1c1c}
"""


@dataclass
class Sample:
    """One row of the before / after grid."""

    id: str
    method: str
    status: str | None
    privacy_flag: bool | None
    original_jpeg: bytes
    anonymized_jpeg: bytes
    scores: dict[str, float | None] = field(default_factory=dict)
    public_caption: str | None = None
    edit_instruction: str | None = None


def _data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def metric_plot(label: str, arrow: str, values: dict[str, list[float]]) -> bytes | None:
    """A PNG: the distribution of one metric per method (horizontal box plot + jittered points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = [m for m, v in values.items() if v]
    if not methods:
        return None
    fig, ax = plt.subplots(figsize=(5.6, 0.9 + 0.5 * len(methods)), dpi=100)
    data = [np.asarray(values[m], dtype=float) for m in methods]
    ax.boxplot(data, orientation="horizontal", tick_labels=methods, widths=0.5, showfliers=False)
    rng = np.random.default_rng(0)
    for i, arr in enumerate(data, start=1):
        ax.scatter(arr, i + rng.uniform(-0.15, 0.15, len(arr)), s=8, alpha=0.5, color="#2b6cb0")
    low, high = min(float(a.min()) for a in data), max(float(a.max()) for a in data)
    if high - low < 1e-3:  # (nearly) constant values: a readable axis instead of float-noise ticks
        ax.set_xlim(low - 0.05 * max(1.0, abs(low)), high + 0.05 * max(1.0, abs(high)))
    ax.ticklabel_format(axis="x", useOffset=False)
    ax.set_title(f"{label} {arrow}", fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _best(summary: dict[str, Any], metric: str) -> str | None:
    info = summary["metrics"][metric]
    means = {m: s["metrics"][metric]["mean"] for m, s in summary["methods"].items()}
    means = {m: v for m, v in means.items() if v is not None}
    if len(means) < 2:
        return None
    pick = max if info["direction"] == "up" else min
    best = pick(means, key=means.__getitem__)
    ties = [m for m, v in means.items() if abs(v - means[best]) <= 1e-9]
    return best if len(ties) == 1 else None  # a tie has no winner


def metrics_table(summary: dict[str, Any]) -> str:
    methods = list(summary["methods"])
    head = "".join(f"<th>{html.escape(m)}</th>" for m in methods)
    rows = [f"<table><tr><th class='name'>metric</th><th></th>{head}</tr>"]
    for group, title in GROUPS:
        names = [n for n, info in summary["metrics"].items() if info["group"] == group]
        if not names:
            continue
        rows.append(f"<tr class='group'><td colspan='{len(methods) + 2}'>{title}</td></tr>")
        for name in names:
            info = summary["metrics"][name]
            arrow = "↑" if info["direction"] == "up" else "↓"
            best = _best(summary, name)
            cells = []
            for method in methods:
                s = summary["methods"][method]["metrics"][name]
                ci = s["ci95"]
                ci_text = f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else ""
                reasons = "; ".join(f"{k}: {v}" for k, v in s["skipped_reasons"].items())
                skip = (
                    f"<div class='skip' title='{html.escape(reasons)}'>skipped {s['skipped']}"
                    + (f": {html.escape(reasons)}" if not s["n"] else "") + "</div>"
                    if s["skipped"] else ""
                )  # fmt: skip
                cls = " class='best'" if method == best else ""
                cells.append(
                    f"<td{cls}>{_fmt(s['mean'])}<div class='ci'>{ci_text} n={s['n']}</div>{skip}</td>"
                )
            tip, label = html.escape(info["description"]), html.escape(info["label"])
            name_cell = f"<td class='name' title='{tip}'>{label}</td>"
            rows.append(f"<tr>{name_cell}<td>{arrow}</td>{''.join(cells)}</tr>")
    rows.append("</table>")
    return "".join(rows)


def counts_table(summary: dict[str, Any]) -> str:
    head = "<tr><th class='name'>method</th><th>rows</th><th>kept</th><th>edited</th><th>error</th>"
    head += "<th>scored</th><th>not scored</th><th>missing</th></tr>"
    rows = [f"<table>{head}"]
    for method, m in summary["methods"].items():
        by = m["by_status"]
        errors = ", ".join(f"{k}: {v}" for k, v in m["errors_by_stage"].items())
        not_scored = ", ".join(f"{k}: {v}" for k, v in m["not_scored"].items())
        rows.append(
            f"<tr><td class='name'>{html.escape(method)}</td><td>{m['rows']}</td><td>{by.get('kept', 0)}</td>"
            f"<td>{by.get('edited', 0)}</td><td title='{html.escape(errors)}'>{m['errors']}</td>"
            f"<td>{m['scored']}</td>"
            f"<td title='{html.escape(not_scored)}'>{sum(m['not_scored'].values())}</td>"
            f"<td>{m['missing']}</td></tr>"
        )
    rows.append("</table>")
    return "".join(rows)


def sample_card(sample: Sample, summary: dict[str, Any], private_text: bool) -> str:
    flag = "<span class='flag'>flagged</span> " if sample.privacy_flag else ""
    scores = " · ".join(
        f"{html.escape(summary['metrics'][k]['label'])} {_fmt(v)}" for k, v in sample.scores.items()
    )
    texts = ""
    if private_text:
        for title, text in (("public caption", sample.public_caption), ("edit", sample.edit_instruction)):
            if text:
                texts += f"<div class='text'><b>{title}:</b> {html.escape(text)}</div>"
    method = html.escape(sample.method)
    original, anonymized = (
        _data_url(x, "image/jpeg") for x in (sample.original_jpeg, sample.anonymized_jpeg)
    )
    status = html.escape(sample.status or "")
    return (
        f"<div class='card'><div class='pair'>"
        f"<figure><img alt='original' src='{original}'><figcaption>original</figcaption></figure>"
        f"<figure><img alt='{method}' src='{anonymized}'><figcaption>{method}</figcaption></figure></div>"
        f"<div class='muted'>{flag}{status} · id {html.escape(sample.id[:20])}</div>"
        f"{texts}<div class='scores'>{scores}</div></div>"
    )


def render_report(
    summary: dict[str, Any],
    values: dict[str, dict[str, list[float]]],
    samples: dict[str, list[Sample]],
    private_text: bool = False,
    title: str = "u2s evaluation",
) -> str:
    """The report's HTML. ``values``: metric → method → per-row values (for the plots); ``samples``:
    method → its sampled rows, in display order."""
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><div class='muted'>{created} · {summary['originals']} originals · "
        f"{len(summary['methods'])} method(s) · ↑ higher is better, ↓ lower is better; bold: best mean. "
        "Quality and Cheating groups, and their directions, are the paper's inferred split.</div>",
        "<h2>Metrics</h2>",
        "<div class='muted'>Mean over the method's published rows (kept rows are original pixels) with a "
        "95% bootstrap CI and n; skipped pairs are not in the mean (hover for reasons).</div>",
        metrics_table(summary),
        "<h2>Rows</h2>",
        counts_table(summary),
        "<h2>Distributions</h2><div class='plots'>",
    ]
    for metric, per_method in values.items():
        info = summary["metrics"][metric]
        arrow = "↑" if info["direction"] == "up" else "↓"
        png = metric_plot(info["label"], arrow, per_method)
        if png is not None:
            parts.append(f"<img alt='{html.escape(info['label'])}' src='{_data_url(png, 'image/png')}'>")
    parts.append("</div><h2>Before / after</h2>")
    if not private_text:
        parts.append("<div class='muted'>Captions and edit instructions are shown only in a report written "
                     "on the sensitive side.</div>")  # fmt: skip
    for method, rows in samples.items():
        parts.append(f"<h3>{html.escape(method)}</h3>")
        if not rows:
            parts.append("<div class='muted'>no scored row to show</div>")
            continue
        parts.append("<div class='grid'>")
        parts += [sample_card(sample, summary, private_text) for sample in rows]
        parts.append("</div>")
    parts.append("</body></html>")
    return "".join(parts)

"""``report.html``: one self-contained page (no external files) a person opens to compare methods.

- a banner when some model behind the numbers has random weights (``summary["random_models"]``);
- a table of every metric per method, grouped Privacy / Quality / Cheating: first over the rows the
  method edited, then over all its published rows (mean, 95% CI, n), with direction arrows, the best
  method per metric and scope in bold, skips with reasons on hover; a metric that could not load reads
  "n/a" with one footnote per reason saying how to enable it;
- row counts per method (kept, edited, error, not scored, missing);
- one matplotlib plot per metric: its distribution per method (box plot + points), as a base64 PNG;
- a before / after grid per method of sampled rows: edited rows, then error rows (their content-free
  reason, no image), then kept rows, as base64 JPEGs with each row's scores. Public captions and edit
  instructions appear only when ``private_text`` is set (the report is then written on the sensitive
  side); otherwise the page holds no caption, instruction or path.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from u2s.eval.summary import is_unavailable, unavailable_metrics

GROUPS = (("privacy", "Privacy"), ("quality", "Quality"), ("cheating", "Cheating"))
#: The two scopes of every metric: the rows the method rewrote, and every row it published.
SCOPES = (("edited", "edited rows"), ("all", "all rows"))
#: Grid sections in display order: (title, statuses); rows of other statuses go to the last one.
SECTIONS = (("edited", "Edited"), ("error", "Errors (not published as images)"),
            ("kept", "Kept: published unchanged (original pixels)"))  # fmt: skip

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d232a;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #dde3ea}
h3{font-size:15px;margin:18px 0 6px}.muted{color:#5b6773;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:6px 0}th,td{border:1px solid #dde3ea;padding:4px 8px;
text-align:right;vertical-align:top}th{background:#f3f6f9}td.name,th.name{text-align:left}
td.best{font-weight:700;background:#eef8ee}.ci{color:#5b6773;font-size:11px}.skip{color:#5b6773;font-size:11px}
td.na{color:#5b6773}td.scope-all{border-right:2px solid #c9d2dc}.notes{font-size:12px;color:#3d4852}
.banner{border:1px solid #e0b252;background:#fff7e0;border-radius:6px;padding:8px 12px;margin:12px 0}
th[colspan]{text-align:center}h4{font-size:13px;margin:12px 0 6px;color:#3d4852}
.card.error{background:#fbfbfc}.reason{font-family:ui-monospace,monospace;font-size:12px;margin:6px 0}
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
    original_jpeg: bytes | None = None
    anonymized_jpeg: bytes | None = None
    scores: dict[str, float | None] = field(default_factory=dict)
    error: str | None = None  # the row's content-free error reason (error rows have no images)
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


def _stat(method_summary: dict[str, Any], metric: str, scope: str) -> dict[str, Any]:
    stat = method_summary["metrics"][metric]
    return stat if scope == "all" else stat["edited"]


def _best(summary: dict[str, Any], metric: str, scope: str) -> str | None:
    info = summary["metrics"][metric]
    means = {m: _stat(s, metric, scope)["mean"] for m, s in summary["methods"].items()}
    means = {m: v for m, v in means.items() if v is not None}
    if len(means) < 2:
        return None
    pick = max if info["direction"] == "up" else min
    best = pick(means, key=means.__getitem__)
    ties = [m for m, v in means.items() if abs(v - means[best]) <= 1e-9]
    return best if len(ties) == 1 else None  # a tie has no winner


def _cell(stat: dict[str, Any], scope: str, best: bool) -> str:
    ci = stat["ci95"]
    ci_text = f"[{_fmt(ci[0])}, {_fmt(ci[1])}] " if ci else ""
    skip = ""
    if scope == "all" and stat["skipped"]:
        reasons = "; ".join(f"{k}: {v}" for k, v in stat["skipped_reasons"].items())
        shown = f": {html.escape(reasons)}" if not stat["n"] else ""
        skip = f"<div class='skip' title='{html.escape(reasons)}'>skipped {stat['skipped']}{shown}</div>"
    classes = " ".join(c for c in (f"scope-{scope}", "best" if best else "") if c)
    mean = _fmt(stat["mean"]) if stat["n"] else "–"
    return f"<td class='{classes}'>{mean}<div class='ci'>{ci_text}n={stat['n']}</div>{skip}</td>"


def metrics_table(summary: dict[str, Any], notes: list[dict[str, Any]]) -> str:
    """Metrics × (method × scope); ``notes`` (:func:`u2s.eval.summary.unavailable_metrics`) number the
    "n/a" footnotes."""
    methods = list(summary["methods"])
    note_of = {note["reason"]: i for i, note in enumerate(notes, start=1)}
    head = "".join(f"<th colspan='2'>{html.escape(m)}</th>" for m in methods)
    scopes = "".join(f"<th class='scope-{key}'>{title}</th>" for _ in methods for key, title in SCOPES)
    rows = [f"<table class='metrics'><tr><th class='name'>metric</th><th></th>{head}</tr>"
            f"<tr><th class='name'></th><th></th>{scopes}</tr>"]  # fmt: skip
    for group, title in GROUPS:
        names = [n for n, info in summary["metrics"].items() if info["group"] == group]
        if not names:
            continue
        rows.append(f"<tr class='group'><td colspan='{2 * len(methods) + 2}'>{title}</td></tr>")
        for name in names:
            info = summary["metrics"][name]
            arrow = "↑" if info["direction"] == "up" else "↓"
            best = {scope: _best(summary, name, scope) for scope, _ in SCOPES}
            cells = []
            for method in methods:
                stat = summary["methods"][method]["metrics"][name]
                if is_unavailable(stat):
                    mark = note_of.get(next(iter(stat["skipped_reasons"])), "")
                    sup = f"<sup><a href='#note-{mark}'>{mark}</a></sup>" if mark else ""
                    cells += [f"<td class='na scope-{scope}'>n/a{sup}</td>" for scope, _ in SCOPES]
                    continue
                cells += [
                    _cell(_stat(summary["methods"][method], name, scope), scope, method == best[scope])
                    for scope, _ in SCOPES
                ]
            tip, label = html.escape(info["description"]), html.escape(info["label"])
            name_cell = f"<td class='name' title='{tip}'>{label}</td>"
            rows.append(f"<tr>{name_cell}<td>{arrow}</td>{''.join(cells)}</tr>")
    rows.append("</table>")
    return "".join(rows)


def unavailable_notes(summary: dict[str, Any], notes: list[dict[str, Any]]) -> str:
    """One footnote per reason a metric could not load, with how to enable it."""
    if not notes:
        return ""
    items = []
    for i, note in enumerate(notes, start=1):
        labels = ", ".join(html.escape(summary["metrics"][n]["label"]) for n in note["metrics"])
        items.append(
            f"<li id='note-{i}'>n/a: {labels} could not run ({html.escape(note['reason'])}). "
            f"To enable: {html.escape(note['hint'])}.</li>"
        )
    return f"<ol class='notes'>{''.join(items)}</ol>"


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


def sample_card(
    sample: Sample, summary: dict[str, Any], private_text: bool, hidden: frozenset[str] = frozenset()
) -> str:
    """A row's card: both images and its scores (but the ``hidden`` metrics: unavailable ones), or, for
    an error row, its reason."""
    flag = "<span class='flag'>flagged</span> " if sample.privacy_flag else ""
    status = html.escape(sample.status or "")
    meta = f"<div class='muted'>{flag}{status} · id {html.escape(sample.id[:20])}</div>"
    if sample.status == "error" or sample.original_jpeg is None or sample.anonymized_jpeg is None:
        reason = html.escape(sample.error or "no reason recorded")
        return (f"<div class='card error' data-status='{status}'>{meta}"
                f"<div class='reason'>error: {reason}</div></div>")  # fmt: skip
    scores = " · ".join(
        f"{html.escape(summary['metrics'][k]['label'])} {_fmt(v)}"
        for k, v in sample.scores.items()
        if k not in hidden
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
    return (
        f"<div class='card' data-status='{status}'><div class='pair'>"
        f"<figure><img alt='original' src='{original}'><figcaption>original</figcaption></figure>"
        f"<figure><img alt='{method}' src='{anonymized}'><figcaption>{method}</figcaption></figure></div>"
        f"{meta}{texts}<div class='scores'>{scores}</div></div>"
    )


def sample_sections(rows: list[Sample]) -> dict[str, list[Sample]]:
    """A method's sampled rows by grid section (:data:`SECTIONS`), each in the given order."""
    sections: dict[str, list[Sample]] = {key: [] for key, _ in SECTIONS}
    for sample in rows:
        sections[sample.status if sample.status in sections else SECTIONS[-1][0]].append(sample)
    return sections


def random_banner(random_models: dict[str, list[str]] | None) -> str:
    """A warning that (some) numbers come from random-weight models, naming their config keys."""
    if not random_models:
        return ""
    who = "; ".join(
        f"{'the evaluation' if name == 'eval' else html.escape(name)}: {html.escape(', '.join(keys))}"
        for name, keys in random_models.items()
    )
    return (
        "<div class='banner' role='alert'><b>Random models.</b> Some models behind these numbers have "
        f"random weights (built by <code>u2s tiny-models</code>): {who}. The figures show that the "
        "pipeline runs end to end; they say nothing about how well a method anonymizes. Run with real "
        "models (e.g. <code>--preset paper</code>, <code>--clip-model openai/clip-vit-large-patch14</code>)"
        " for meaningful figures.</div>"
    )


def render_report(
    summary: dict[str, Any],
    values: dict[str, dict[str, list[float]]],
    samples: dict[str, list[Sample]],
    private_text: bool = False,
    title: str = "u2s evaluation",
) -> str:
    """The report's HTML. ``values``: metric → method → per-row values (for the plots); ``samples``:
    method → its sampled rows (shown by section: edited, error, kept; in the given order within each).
    ``summary["random_models"]`` (:func:`u2s.eval.random_models.random_models`) adds the banner."""
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    notes = summary.get("unavailable")
    notes = unavailable_metrics(summary) if notes is None else notes
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><div class='muted'>{created} · {summary['originals']} originals · "
        f"{len(summary['methods'])} method(s) · ↑ higher is better, ↓ lower is better; bold: best mean. "
        "Quality and Cheating groups, and their directions, are the paper's inferred split.</div>",
        random_banner(summary.get("random_models")),
        "<h2>Metrics</h2>",
        "<div class='muted'>Per method, first over the rows it <b>edited</b>, then over <b>all rows</b> "
        "it published. Kept rows are original pixels and score alike for every method that keeps them, "
        "so the edited rows tell the methods apart. Each cell: mean, 95% percentile-bootstrap CI of the "
        "mean and n; skipped pairs are not in the mean (hover for reasons).</div>",
        metrics_table(summary, notes),
        unavailable_notes(summary, notes),
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
            parts.append("<div class='muted'>no row to show</div>")
            continue
        sections = sample_sections(rows)
        stats = summary["methods"].get(method, {}).get("metrics", {})
        hidden = frozenset(metric for metric, stat in stats.items() if is_unavailable(stat))
        for key, heading in SECTIONS:
            if shown := sections[key]:
                parts.append(f"<h4 class='section'>{heading} ({len(shown)})</h4><div class='grid'>")
                parts += [sample_card(sample, summary, private_text, hidden) for sample in shown]
                parts.append("</div>")
    parts.append("</body></html>")
    return "".join(parts)

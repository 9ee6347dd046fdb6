"""report.html: self-contained, no private text by default, and, as headless Chromium renders it: edited
and all-rows means with CIs, unavailable metrics as n/a with one footnote, edited and error rows before
kept ones, error rows with their reason, and a banner when models are random."""

from __future__ import annotations

import html
import io
import json
import re
import subprocess

import pytest
from PIL import Image

from u2s.eval.report import Sample, render_report
from u2s.eval.summary import unavailable_metrics
from u2s.testing.browser import FLAGS, check_page, find_chromium, is_blank

PRIVATE = "Jane Doe at 12 Elm Street"
EDIT = "replace the face with a different person"
UNAVAILABLE = "unavailable: ModuleNotFoundError (torchvision)"
ERROR = "edit: unexpected OSError"

#: Appended to the page: after load, what a person sees (rendered text of the table rows, footnotes,
#: banner, and each before/after card under its method heading) as JSON in a <pre id="u2s-seen">.
SEEN_SCRIPT = """<script>window.addEventListener("load", () => {
  const visible = (el) => el.getBoundingClientRect().height > 0;
  const rows = [...document.querySelectorAll("table.metrics tr")]
    .map((tr) => [...tr.cells].map((c) => c.innerText));
  let method = null;
  const cards = [];
  for (const el of document.querySelectorAll("h3, .card")) {
    if (el.tagName === "H3") { method = el.innerText; continue; }
    cards.push({method, text: el.innerText, images: el.querySelectorAll("img").length, visible: visible(el)});
  }
  const notes = [...document.querySelectorAll(".notes li")].map((li) => li.innerText);
  const banner = [...document.querySelectorAll(".banner")].filter(visible).map((el) => el.innerText);
  const out = document.createElement("pre");
  out.id = "u2s-seen";
  out.textContent = JSON.stringify({rows, cards, notes, banner});
  document.body.appendChild(out);
});</script>"""


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG")
    return buf.getvalue()


def _summary() -> dict:
    def stat(mean, n, edited_mean, edited_n, skipped=0, reasons=None):
        def ci(m, k):
            return [m - 0.1, m + 0.1] if k > 1 else None

        edited = {"mean": edited_mean, "ci95": ci(edited_mean, edited_n), "n": edited_n}
        return {"mean": mean, "ci95": ci(mean, n), "n": n, "skipped": skipped,
                "skipped_reasons": reasons or {}, "edited": edited}  # fmt: skip

    metrics = {
        "face_sim": {"label": "FaceSim", "group": "privacy", "direction": "down", "description": "d"},
        "ssim": {"label": "SSIM", "group": "cheating", "direction": "down", "description": "d"},
        "lpips": {"label": "LPIPS", "group": "cheating", "direction": "up", "description": "d"},
    }
    methods = {
        name: {"rows": 6, "scored": 5, "by_status": {"edited": 2, "kept": 3, "error": 1}, "errors": 1,
               "errors_by_stage": {"edit": 1}, "not_scored": {}, "missing": 0,
               "metrics": {"face_sim": stat(f, 5, fe, 2), "ssim": stat(s, 5, se, 2),
                           "lpips": stat(None, 0, None, 0, 5, {UNAVAILABLE: 5})}}
        for name, f, fe, s, se in (("u2s", 0.76, 0.4, 0.6, 0.3), ("blur", 0.88, 0.7, 0.9, 0.75))
    }  # fmt: skip
    summary = {"metrics": metrics, "originals": 6, "methods": methods}
    summary["unavailable"] = unavailable_metrics(summary)
    summary["random_models"] = {
        "eval": ["models.clip"],
        "u2s": ["stage1.vlm", "stage2.instruct_pix2pix.model"],
    }
    return summary


@pytest.fixture(scope="module")
def report_parts():
    from skimage import data

    astronaut = Image.fromarray(data.astronaut()).resize((192, 192))
    blurred = astronaut.resize((16, 16)).resize((192, 192))
    original, anonymized = _jpeg(astronaut), _jpeg(blurred)

    def row(i: str, method: str, status: str) -> Sample:
        if status == "error":
            return Sample(id=i, method=method, status="error", privacy_flag=None, error=ERROR)
        return Sample(
            id=i, method=method, status=status, privacy_flag=status == "edited", original_jpeg=original,
            anonymized_jpeg=anonymized if status == "edited" else original,
            scores={"face_sim": 0.5, "ssim": 0.7, "lpips": None},
            public_caption="a person in a suit" if status == "edited" else None,
            edit_instruction=EDIT if status == "edited" else None,
        )  # fmt: skip

    # given in an order that puts kept rows first: the page must still lead with edited and error rows
    order = (("k1", "kept"), ("x1", "error"), ("e1", "edited"), ("k2", "kept"), ("e2", "edited"))
    samples = {method: [row(i, method, status) for i, status in order] for method in ("u2s", "blur")}
    values = {
        "face_sim": {"u2s": [0.3, 0.4, 0.5], "blur": [0.6, 0.7, 0.8]},
        "ssim": {"u2s": [0.5, 0.6, 0.7], "blur": [0.8, 0.9, 1.0]},
        "lpips": {"u2s": [], "blur": []},
    }
    return _summary(), values, samples


def _seen(page: str, tmp_path) -> dict:
    """The page as headless Chromium renders it (:data:`SEEN_SCRIPT`'s JSON from ``--dump-dom``)."""
    browser = find_chromium()
    assert browser, "chromium is needed (Debian: apt-get install -y chromium; .ci/run installs it)"
    path = tmp_path / "seen.html"
    path.write_text(page.replace("</body>", SEEN_SCRIPT + "</body>"), encoding="utf-8")
    command = [browser, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
               "--window-size=1280,2000", "--dump-dom", path.as_uri()]  # fmt: skip
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    found = re.search(r'<pre id="u2s-seen">(.*?)</pre>', dom, re.S)
    assert found, "the page's load event did not run in the browser"
    return json.loads(html.unescape(found.group(1)))


def test_report_is_self_contained_and_marks_directions_and_bests(report_parts):
    page = render_report(*report_parts)
    assert "↓" in page and "↑" in page
    assert not re.search(r"""(src|href)=['"](?!data:|#)""", page)  # every resource is embedded
    assert page.count("data:image/jpeg;base64,") == 16  # 4 rows with images × 2 images × 2 methods
    assert page.count("data:image/png;base64,") == 2  # one plot per metric with values
    # the best mean per metric and scope is bold: lower FaceSim and SSIM (u2s), edited and all rows
    assert page.count("best'") == 4
    summary, values, samples = report_parts
    tied = json.loads(json.dumps(summary))
    tied["methods"]["blur"]["metrics"]["ssim"]["mean"] = tied["methods"]["u2s"]["metrics"]["ssim"]["mean"]
    assert render_report(tied, values, samples).count("best'") == 3  # a tie has no winner
    real = json.loads(json.dumps(summary))
    del real["random_models"]
    assert "Random models" not in render_report(real, values, samples)


def test_default_report_shows_no_private_text(report_parts):
    summary, values, samples = report_parts
    for rows in samples.values():
        for sample in rows:
            sample.public_caption = PRIVATE if sample.status == "edited" else None
    assert PRIVATE not in render_report(summary, values, samples)
    assert EDIT not in render_report(summary, values, samples)
    shown = render_report(summary, values, samples, private_text=True)
    assert PRIVATE in shown and EDIT in shown


def test_report_as_chromium_renders_it(report_parts, tmp_path):
    seen = _seen(render_report(*report_parts), tmp_path)
    rows = {cells[0]: cells[2:] for cells in seen["rows"] if len(cells) > 2}
    # per method: the edited-rows mean with its CI and n first, then the all-rows one
    assert rows[""] == ["edited rows", "all rows"] * 2
    u2s_edited, u2s_all = rows["FaceSim"][:2]
    assert u2s_edited.split() == ["0.400", "[0.300,", "0.500]", "n=2"]
    assert u2s_all.split() == ["0.760", "[0.660,", "0.860]", "n=5"]
    # an unavailable metric: a neutral n/a pointing at one footnote that says how to enable it
    assert [cell.strip() for cell in rows["LPIPS"]] == ["n/a1"] * 4
    assert not any("ModuleNotFoundError" in cell for cells in seen["rows"] for cell in cells)
    assert len(seen["notes"]) == 1
    assert UNAVAILABLE in seen["notes"][0] and "pip install torchvision" in seen["notes"][0]
    # the grid: edited rows, then error rows (reason, no image), then kept rows, for each method
    for method in ("u2s", "blur"):
        cards = [card for card in seen["cards"] if card["method"] == method]
        assert all(card["visible"] for card in cards)
        statuses = [next(s for s in ("edited", "error", "kept") if s in card["text"]) for card in cards]
        assert statuses == ["edited", "edited", "error", "kept", "kept"]
        error = cards[2]
        assert f"error: {ERROR}" in error["text"] and "x1" in error["text"] and error["images"] == 0
        assert [card["images"] for card in cards if card is not error] == [2] * 4
        assert all(
            "SSIM 0.700" in card["text"] and "LPIPS" not in card["text"]
            for card in cards
            if card is not error
        )
    # random models are announced, naming which
    assert len(seen["banner"]) == 1 and "Random models" in seen["banner"][0]
    assert "models.clip" in seen["banner"][0] and "stage1.vlm" in seen["banner"][0]


def test_report_renders_in_headless_chromium(report_parts, tmp_path):
    assert find_chromium(), "chromium is needed (Debian: apt-get install -y chromium; .ci/run installs it)"
    path = tmp_path / "report.html"
    path.write_text(render_report(*report_parts), encoding="utf-8")
    seen = check_page(path, tmp_path / "shot.png")
    assert seen.images == 18 and seen.broken == 0
    assert not is_blank(seen.screenshot)


def test_browser_check_catches_a_broken_image_and_a_blank_page(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<html><body><img src='data:image/jpeg;base64,AAAA'></body></html>", encoding="utf-8")
    seen = check_page(page, tmp_path / "shot.png", width=400, height=300)
    assert (seen.images, seen.broken) == (1, 1)
    assert is_blank(seen.screenshot)

"""report.html: self-contained, no private text by default, and it renders in a real headless Chromium."""

from __future__ import annotations

import io
import json
import re

import pytest
from PIL import Image

from u2s.eval.report import Sample, render_report
from u2s.testing.browser import check_page, find_chromium, is_blank

PRIVATE = "Jane Doe at 12 Elm Street"
EDIT = "replace the face with a different person"


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG")
    return buf.getvalue()


def _summary() -> dict:
    def stat(mean, n, skipped=0, reasons=None):
        return {"mean": mean, "ci95": [mean - 0.1, mean + 0.1] if n > 1 else None, "n": n, "skipped": skipped,
                "skipped_reasons": reasons or {}, "edited": {"mean": mean, "ci95": None, "n": n}}  # fmt: skip

    metrics = {
        "face_sim": {"label": "FaceSim", "group": "privacy", "direction": "down", "description": "d"},
        "ssim": {"label": "SSIM", "group": "cheating", "direction": "down", "description": "d"},
        "lpips": {"label": "LPIPS", "group": "cheating", "direction": "up", "description": "d"},
    }
    unavailable = {"unavailable: ModuleNotFoundError (torchvision)": 3}
    methods = {
        name: {"rows": 4, "scored": 3, "by_status": {"edited": 2, "kept": 1, "error": 1}, "errors": 1,
               "errors_by_stage": {"edit": 1}, "not_scored": {}, "missing": 0,
               "metrics": {"face_sim": stat(f, 3), "ssim": stat(s, 3),
                           "lpips": stat(None, 0, 3, unavailable)}}
        for name, f, s in (("u2s", 0.4, 0.6), ("blur", 0.7, 0.9))
    }  # fmt: skip
    return {"metrics": metrics, "originals": 4, "methods": methods}


@pytest.fixture(scope="module")
def report_parts():
    from skimage import data

    astronaut = Image.fromarray(data.astronaut()).resize((192, 192))
    blurred = astronaut.resize((16, 16)).resize((192, 192))
    samples = {
        method: [Sample(id=f"id{i}", method=method, status="edited", privacy_flag=True,
                        original_jpeg=_jpeg(astronaut), anonymized_jpeg=_jpeg(blurred),
                        scores={"face_sim": 0.5, "ssim": 0.7, "lpips": None},
                        public_caption="a person in a suit", edit_instruction=EDIT) for i in range(3)]
        for method in ("u2s", "blur")
    }  # fmt: skip
    values = {
        "face_sim": {"u2s": [0.3, 0.4, 0.5], "blur": [0.6, 0.7, 0.8]},
        "ssim": {"u2s": [0.5, 0.6, 0.7], "blur": [0.8, 0.9, 1.0]},
        "lpips": {"u2s": [], "blur": []},
    }
    return _summary(), values, samples


def test_report_is_self_contained_and_marks_directions_and_skips(report_parts):
    page = render_report(*report_parts)
    assert "↓" in page and "↑" in page
    assert "unavailable: ModuleNotFoundError (torchvision)" in page
    assert not re.search(r"""(src|href)=['"](?!data:)""", page)  # every resource is embedded
    assert page.count("data:image/jpeg;base64,") == 12  # 3 rows × 2 images × 2 methods
    assert page.count("data:image/png;base64,") == 2  # one plot per metric with values
    # the best mean per metric is bold: lower FaceSim (u2s) and lower SSIM (u2s); a tie has no winner
    assert page.count("class='best'") == 2
    summary, values, samples = report_parts
    tied = json.loads(json.dumps(summary))
    tied["methods"]["blur"]["metrics"]["ssim"]["mean"] = tied["methods"]["u2s"]["metrics"]["ssim"]["mean"]
    assert render_report(tied, values, samples).count("class='best'") == 1


def test_default_report_shows_no_private_text(report_parts):
    summary, values, samples = report_parts
    for rows in samples.values():
        for sample in rows:
            sample.public_caption = PRIVATE
    assert PRIVATE not in render_report(summary, values, samples)
    assert EDIT not in render_report(summary, values, samples)
    shown = render_report(summary, values, samples, private_text=True)
    assert PRIVATE in shown and EDIT in shown


def test_report_renders_in_headless_chromium(report_parts, tmp_path):
    assert find_chromium(), "chromium is needed (Debian: apt-get install -y chromium; .ci/run installs it)"
    path = tmp_path / "report.html"
    path.write_text(render_report(*report_parts), encoding="utf-8")
    seen = check_page(path, tmp_path / "shot.png")
    assert seen.images == 14 and seen.broken == 0
    assert not is_blank(seen.screenshot)


def test_browser_check_catches_a_broken_image_and_a_blank_page(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<html><body><img src='data:image/jpeg;base64,AAAA'></body></html>", encoding="utf-8")
    seen = check_page(page, tmp_path / "shot.png", width=400, height=300)
    assert (seen.images, seen.broken) == (1, 1)
    assert is_blank(seen.screenshot)

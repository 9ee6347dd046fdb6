"""Headless Chromium for tests: screenshot a page and check that every image on it loaded.

Uses the system's ``chromium`` (Debian's package; ``.ci/run`` installs it when missing). The page is
copied with a small script appended that records, after the load event, how many images it has and
how many did not load (``img.complete && img.naturalWidth > 0``); ``--dump-dom`` returns the DOM then.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
)  # fmt: skip

CHECK_SCRIPT = """<script>window.addEventListener("load", () => {
  const images = [...document.images];
  const broken = images.filter((img) => !(img.complete && img.naturalWidth > 0)).length;
  document.body.setAttribute("data-u2s-images", images.length);
  document.body.setAttribute("data-u2s-broken", broken);
});</script>"""


@dataclass(frozen=True)
class PageCheck:
    """What the browser saw: image count, images that did not load, and the screenshot's path."""

    images: int
    broken: int
    screenshot: Path


def find_chromium() -> str | None:
    """The Chromium executable on PATH (``chromium``, ``chromium-browser`` or ``google-chrome``)."""
    return next(
        (p for name in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(name))), None
    )


def _run(browser: str, profile: str, args: list[str], timeout: float) -> str:
    command = [browser, *FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=True).stdout


def check_page(html_path: str | Path, screenshot: str | Path, width: int = 1280, height: int = 2000,
               timeout: float = 120.0) -> PageCheck:  # fmt: skip
    """Load ``html_path`` in headless Chromium: count images that did not load, and screenshot it."""
    browser = find_chromium()
    if browser is None:
        raise FileNotFoundError("no chromium on PATH (Debian: apt-get install -y chromium)")
    html_path, screenshot = Path(html_path).resolve(), Path(screenshot).resolve()
    with tempfile.TemporaryDirectory(prefix="u2s-chromium-") as tmp:
        page = Path(tmp) / "page.html"
        page.write_text(html_path.read_text(encoding="utf-8").replace("</body>", CHECK_SCRIPT + "</body>"),
                        encoding="utf-8")  # fmt: skip
        dom = _run(
            browser, f"{tmp}/profile", ["--virtual-time-budget=5000", "--dump-dom", page.as_uri()], timeout
        )
        _run(browser, f"{tmp}/profile", [f"--screenshot={screenshot}", f"--window-size={width},{height}",
                                          html_path.as_uri()], timeout)  # fmt: skip
    body = re.search(r"<body[^>]*>", dom)
    attrs = dict(re.findall(r'data-u2s-(images|broken)="(\d+)"', body.group(0) if body else ""))
    if set(attrs) != {"images", "broken"}:
        raise RuntimeError("the page's load event did not run in the browser")
    return PageCheck(images=int(attrs["images"]), broken=int(attrs["broken"]), screenshot=screenshot)


def is_blank(png: str | Path, background_tolerance: int = 8, min_fraction: float = 0.02) -> bool:
    """Whether a screenshot is (nearly) one flat colour: under ``min_fraction`` of its pixels differ from
    its most common colour by more than ``background_tolerance``."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16).reshape(-1, 3)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    background = colours[counts.argmax()]
    differs = np.abs(pixels - background).max(axis=1) > background_tolerance
    return float(differs.mean()) < min_fraction

"""What a command prints, as a user sees it: its own lines, not the libraries' known-harmless notices."""

from __future__ import annotations

import subprocess
import sys


def test_tiny_models_prints_only_its_table(tmp_path):
    done = subprocess.run([sys.executable, "-m", "u2s.cli", "tiny-models", str(tmp_path / "models")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (done.stdout + done.stderr).splitlines()
    assert [line.split()[0] for line in lines] == [
        "vlm",
        "llm",
        "instruct_pix2pix",
        "sd3",
        "flux_kontext",
        "clip",
    ]
    assert all(line.split()[1].startswith(str(tmp_path / "models")) for line in lines)

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


_NATIVE_WRITER = """
import logging, os, sys
from u2s.quiet import NATIVE_NOTICES, drop_native_notices, quiet_driver
logging.basicConfig(level=logging.WARNING)
quiet_driver()
assert drop_native_notices()
# What Ray's core worker does: write lines to file descriptor 2 from native code.
os.write(2, b"[E core_worker.cc] Actor 'MapWorker' " + NATIVE_NOTICES[0].encode() + b". See the issue.\\n")
os.write(2, b"[E core_worker.cc] a native error a user must see\\n")
logging.getLogger("u2s").warning("a warning of u2s")
print("python stderr", file=sys.stderr, flush=True)
os._exit(3)  # a hard exit: lines already written must still arrive
"""


def test_native_notices_are_dropped_and_everything_else_arrives():
    done = subprocess.run([sys.executable, "-c", _NATIVE_WRITER], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3
    assert "a native error a user must see" in done.stderr
    assert "a warning of u2s" in done.stderr and "python stderr" in done.stderr
    assert "constructor arguments in the object store" not in done.stderr


def test_verbose_keeps_native_notices():
    # Without quiet_driver (what --verbose does) nothing is filtered.
    quiet = "quiet_driver()\nassert drop_native_notices()"
    code = _NATIVE_WRITER.replace(quiet, "assert not drop_native_notices()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3
    assert "constructor arguments in the object store" in done.stderr

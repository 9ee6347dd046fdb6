"""The simulated cluster's stand-in engine and editor (bench/standins.py) are reachable only through the
bench's own registration: u2s never imports bench code, and a config naming them is refused otherwise."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: In a fresh interpreter: load a config naming the stand-ins before and after the bench registers them.
PROBE = """
import json, sys
from u2s.config import ConfigError, load_config
import u2s.cli, u2s.pipeline, u2s.stage1.pool, u2s.stage2.runner  # the run's own code paths

def attempt(overrides):
    try:
        cfg = load_config(preset="cpu-tiny", overrides=overrides)
    except ConfigError as e:
        return str(e)
    return [cfg.stage1.engine_for("inspect"), cfg.stage2.editor]

cases = {"engine": ["stage1.engine=standin"], "call": ["stage1.calls.instruct.engine=standin"],
         "editor": ["stage2.editor=standin"]}
before = {name: attempt(o) for name, o in cases.items()}
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("bench", "standins"))
sys.path.insert(0, sys.argv[1])
import standins
standins.install()
after = {name: attempt(o) for name, o in cases.items()}
print(json.dumps({"before": before, "after": after, "loaded": loaded}))
"""


def test_configs_cannot_name_the_standins_without_the_bench():
    out = subprocess.run([sys.executable, "-c", PROBE, str(REPO / "bench")], capture_output=True, text=True,
                         cwd=REPO, timeout=300, check=True).stdout  # fmt: skip
    result = json.loads(out.strip().splitlines()[-1])
    assert result["loaded"] == []
    before = result["before"]
    assert (
        "stage1.engine: Value error, unknown stage-1 engine 'standin'; available: http, transformers, vllm"
        in (before["engine"])
    )
    assert (
        "stage1.calls.instruct.engine" in before["call"]
        and "available: http, transformers, vllm" in (before["call"])
    )
    assert "stage2.editor: Input should be 'instruct_pix2pix'" in before["editor"]
    assert (
        "'blur_image'" in before["editor"] and "standin" not in before["editor"].split("Input should be")[1]
    )
    # Registered (as the bench does, in every process), the same configs are valid.
    assert result["after"] == {
        "engine": ["standin", "instruct_pix2pix"],
        "call": ["transformers", "instruct_pix2pix"],
        "editor": ["transformers", "standin"],
    }


def test_the_u2s_package_never_imports_bench_code():
    """Every import statement of the package, lazy ones included."""
    found = []
    for path in sorted((REPO / "u2s").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            found += [
                f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in ("bench", "standins")
            ]
    assert found == []

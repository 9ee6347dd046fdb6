"""`--help` as a user reads it: values named the way command lines name them, flags bare, options grouped,
the presets' defaults and the metric names shown."""

from __future__ import annotations

import re

import pytest


def _help(*command: str) -> str:
    from typer.testing import CliRunner

    from u2s.cli import app

    done = CliRunner().invoke(
        app, [*command, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    )
    assert done.exit_code == 0, done.output
    return re.sub(r"\s+", " ", done.output.replace("│", " "))  # panel borders and wrapping out


@pytest.mark.parametrize("command", [("run",), ("submit",), ("eval",), ("plan",), ("eval-utility",)])
def test_no_python_types_and_bare_flags(command):
    text = _help(*command)
    assert not re.search(r"<(str|bool|int|float|path|list\[[a-z]+\])>", text), text
    assert "--help Show this message and exit." in text  # a flag shows no value


def test_run_help_groups_options_and_shows_the_presets_defaults():
    text = _help("run")
    for panel in ("Config", "Input and output", "Cluster", "Resuming"):
        assert f"╭─ {panel} ─" in text
    assert "--set -s KEY=VALUE" in text and "--input URI" in text
    assert "--no-resume" not in text and "--resume Continue an interrupted run" in text
    assert "(default: cpu-tiny: demo-data/images; paper: s3://YOUR-BUCKET/images)" in text


def test_eval_help_names_every_metric_and_the_named_uris():
    from typing import get_args

    from u2s.eval.config import MetricName

    text = _help("eval")
    assert all(name in text for name in get_args(MetricName))
    assert "--method NAME=URI" in text and "--anonymized [NAME=]URI" in text

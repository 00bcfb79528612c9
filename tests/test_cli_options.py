"""The same option means the same thing everywhere: --config is an experiment YAML; the
deployment commands name their own files (--coordinator-config, --site-config), with --config
kept there as a deprecated alias."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from fedpanfm.cli import add_file_option, build_parser


def test_deprecated_alias_still_works_and_warns(capsys: pytest.CaptureFixture[str]) -> None:
    p = argparse.ArgumentParser(prog="fedpanfm site start")
    add_file_option(p, "--site-config", "the site YAML")
    assert p.parse_args(["--site-config", "a.yaml"]).config == Path("a.yaml")
    assert capsys.readouterr().err == ""
    assert p.parse_args(["--config", "b.yaml"]).config == Path("b.yaml")
    assert "--config is deprecated here, use --site-config" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        p.parse_args([])


@pytest.mark.parametrize("argv, new", [
    (["server", "start"], "--coordinator-config"),
    (["federation", "run"], "--coordinator-config"),
    (["site", "start"], "--site-config"),
    (["site", "check"], "--site-config"),
])
def test_deployment_commands_name_their_files(argv: list[str], new: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser([argv[0]])
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"{new} FILE, --config FILE" in help_text and "(--config is a deprecated alias)" in help_text


@pytest.mark.parametrize("command", ["simulate", "pretrain", "evaluate", "study"])
def test_experiment_commands_read_config_as_the_experiment_yaml(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser([command])
    with pytest.raises(SystemExit):
        parser.parse_args([command, "--help"])
    assert "--config CONFIG experiment YAML" in " ".join(capsys.readouterr().out.split())

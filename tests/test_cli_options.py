"""The same option means the same thing everywhere: --config is an experiment YAML; the
deployment commands name their own files (--coordinator-config, --site-config), with --config
kept there as a deprecated alias."""

from __future__ import annotations

import argparse
import re
import shlex
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


ROOT = Path(__file__).resolve().parents[1]
#: Where a deployment's operators read the commands they type.
RUNBOOKS = ("docs/deployment.md", "sites/examples/hospital_a/README.md", "sites/examples/hospital_a/site.yaml",
            "configs/deployment.yaml", "docs/reliability.md")


def runbook_commands(text: str) -> list[str]:
    """Every ``fedpanfm ...`` command with an option in ``text``: the lines of fenced blocks
    (``\\`` continuations joined, ``#`` comments cut) and inline code spans (even wrapped)."""
    commands = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("fedpanfm "):
                commands.append(line)
    # A span wrapped over YAML comment lines continues after the next line's "#".
    inline = re.sub(r"\n\s*#", "\n", re.sub(r"```.*?```", "", text, flags=re.S))
    commands += [" ".join(span.split()) for span in re.findall(r"`(fedpanfm [^`]*--[^`]*)`", inline)]
    return commands


def test_runbook_commands_parse_with_todays_options(capsys: pytest.CaptureFixture[str]) -> None:
    """The commands the runbooks show parse as written, none by a deprecated spelling (the
    loopback tests run these commands: tests/orchestration/test_deployment.py, tests/orchestration/test_runbook_sites.py)."""
    seen = 0
    for doc in RUNBOOKS:
        for command in runbook_commands((ROOT / doc).read_text()):
            # Placeholders become a value; optional parts ([--set ...]) are left out.
            command = re.sub(r"<[^>]*>", "X", re.sub(r"\[[^\]]*\]", "", command))
            if "..." in command:
                continue  # elided on purpose ("fedpanfm certs init --out deploy/certs ...")
            argv = shlex.split(command)[1:]
            try:
                build_parser([argv[0]]).parse_args(argv)
            except SystemExit:
                pytest.fail(f"{doc}: `{command}` does not parse: {capsys.readouterr().err.strip()}")
            assert "deprecated" not in capsys.readouterr().err, f"{doc}: `{command}` uses a deprecated option"
            seen += 1
    assert seen >= 15  # the runbook's commands were found, not skipped

"""``fedpanfm --help``: plain text, every subcommand described, and no heavy import on the way.

How fast it answers is a benchmark's figure, not a test: ``python -m bench.cli_help``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from fedpanfm.cli import build_parser, main, plain, static_help


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_markup_is_removed() -> None:
    assert plain("The ``fedpanfm`` command runs `flwr run .` here") == "The fedpanfm command runs flwr run . here"


def test_overview_is_plain_and_describes_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "`" not in text
    for ep in entry_points(group="fedpanfm.cli"):
        line = next((ln for ln in text.splitlines() if ln.strip().startswith(ep.name + " ")), None)
        assert line is not None and len(line.split(maxsplit=1)) == 2, f"{ep.name} has no description"


def test_the_overview_reads_what_each_plugin_registers() -> None:
    loaded = build_parser()  # every plugin imported
    listed = {a.dest: a.help for a in loaded._subparsers._group_actions[0]._choices_actions}  # type: ignore[union-attr]
    for ep in entry_points(group="fedpanfm.cli"):
        assert static_help(ep) == listed[ep.name], ep.name
    # ... and every subcommand (and sub-action) prints plain text with a description.
    stack = list(_subparsers(loaded).items())
    while stack:
        name, p = stack.pop()
        text = p.format_help()
        assert "`" not in text, name
        assert p.description, f"{name} has no description"
        if any(isinstance(a, argparse._SubParsersAction) for a in p._actions):
            stack += [(f"{name} {k}", v) for k, v in _subparsers(p).items()]


def test_overview_imports_neither_torch_nor_the_plugins() -> None:
    code = ("import sys, contextlib, io\nfrom fedpanfm.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n    main(['--help'])\n"
            "print(sorted(m for m in ('torch', 'flwr', 'ray', 'orchestration.commands', 'fedpanfm.evaluation') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == "[]"


def test_shared_options_mean_the_same_in_simulate() -> None:
    sim = _subparsers(build_parser(["simulate"]))["simulate"]
    opts = {o for a in sim._actions for o in a.option_strings}
    assert {"--config", "--set", "--out", "--resume"} <= opts

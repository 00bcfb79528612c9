"""The fedpanfm command.

Subcommands are plugins registered under the "fedpanfm.cli" entry-point group
(pyproject.toml): each entry is a register(subparsers) callable that adds one subcommand
and sets func on it. This keeps the library free of imports from sites and orchestration
while one command reaches all of them.

Our choices, so that the command answers at once and reads the same everywhere:

- Only the plugin of the subcommand asked for is imported. The overview (fedpanfm --help)
  imports none: each subcommand's one-line help is read from its plugin's source (the help= of
  its add_parser call), which costs milliseconds where importing torch costs seconds.
- Help is plain text: RST markup in docstrings (double backticks) is removed when printed, and a
  subcommand without a description gets its one-line help as description.
- The options shared by jobs mean one thing: --config FILE (the experiment YAML), --set KEY=VALUE
  (repeatable override), --out DIR (the run folder, default
  <logging.run_dir>/<name>-<command>-<time>, fedpanfm/run_folder.py) and --resume RUN_DIR (continue
  that run folder after its last complete step).
- --config is always an experiment YAML. The deployment commands read other files under their
  own names: --coordinator-config (server, federation) and --site-config (site). Their old
  spelling --config still works there, with a deprecation warning (:func:`add_file_option`).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import re
import sys
from collections.abc import Collection
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from fedpanfm import __version__

VERBOSE_HELP = "debug logging; Flower, Ray and library logs on the console too (always in <run>/run.log)"
_MARKUP = re.compile(r"``([^`]*)``|`([^`]*)`")


def plain(text: str) -> str:
    """``text`` without RST inline markup: double and single backticks around code are dropped."""
    return _MARKUP.sub(lambda m: m.group(1) if m.group(1) is not None else m.group(2), text)


class _SubParsers(argparse._SubParsersAction):
    """Subparsers whose help becomes their description when they give none, and which take
    ``-v`` after the subcommand as well (``fedpanfm simulate -v`` = ``fedpanfm -v simulate``)."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        if kwargs.get("description") is None and kwargs.get("help"):
            kwargs["description"] = kwargs["help"]
        parser = super().add_parser(name, **kwargs)
        parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
        return parser


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that prints plain text (see :func:`plain`); subcommands inherit it."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.register("action", "parsers", _SubParsers)

    def format_help(self) -> str:
        return plain(super().format_help())

    def format_usage(self) -> str:
        return plain(super().format_usage())


def _plugins() -> list[EntryPoint]:
    return sorted(entry_points(group="fedpanfm.cli"), key=lambda e: e.name)


def _source_of(module: str) -> Path | None:
    """The source file of ``module`` found without importing it or its parent packages."""
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        base = Path(root, *rest)
        for path in (base.with_suffix(".py"), base / "__init__.py"):
            if path.is_file():
                return path
    return None


def static_help(ep: EntryPoint) -> str | None:
    """The one-line help a plugin gives its subcommand (``add_parser("<name>", help="...")``),
    read from the plugin's source; None when it is not a literal there."""
    path = _source_of(ep.module)
    if path is None:
        return None
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return None
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_parser"
                and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == ep.name):
            for kw in node.keywords:
                if kw.arg == "help" and isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str):
                    return kw.value.value
    return None


def _top_parser() -> Parser:
    parser = Parser(prog="fedpanfm", description="Federated pre-training of a pan-organ imaging foundation model. "
                    "Run 'fedpanfm COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"fedpanfm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    return parser


def _load(ep: EntryPoint, sub: argparse._SubParsersAction) -> None:
    try:
        register = ep.load()
    except ImportError as exc:
        # One broken plugin must not take the other subcommands down with it.
        print(f"fedpanfm: subcommand {ep.name!r} unavailable: {exc}", file=sys.stderr)
        return
    register(sub)


def build_parser(commands: Collection[str] | None = None) -> Parser:
    """The ``fedpanfm`` parser.

    Args:
        commands: the subcommands to load (their plugins are imported and register their
            options); None loads every plugin. The others are listed with their one-line help only.
    """
    parser = _top_parser()
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for ep in _plugins():
        if commands is None or ep.name in commands:
            _load(ep, sub)
        else:
            sub.add_parser(ep.name, help=static_help(ep) or "")
    return parser


def _command_in(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the first argument not an option), if any."""
    names = {ep.name for ep in _plugins()}
    for a in argv:
        if not a.startswith("-"):
            return a if a in names else None
    return None


def add_config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    """The ``--config FILE`` and repeatable ``--set KEY=VALUE`` options every job takes."""
    p.add_argument("--config", required=required, help="experiment YAML (configs/*.yaml)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set model.depth=4 (repeatable)",
    )


class _DeprecatedAlias(argparse.Action):
    """Stores the value; warns when the option was given by its deprecated spelling."""

    def __init__(self, *args: Any, deprecated: str = "", **kwargs: Any) -> None:
        self.deprecated = deprecated
        super().__init__(*args, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if option_string == self.deprecated:
            print(f"{parser.prog}: {self.deprecated} is deprecated here, use {self.option_strings[0]} "
                  f"(--config names an experiment YAML everywhere else)", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_file_option(p: argparse.ArgumentParser, name: str, help: str, deprecated: str = "--config") -> None:
    """A required file option ``name`` (e.g. ``--site-config``), stored as ``args.config``, with
    ``deprecated`` kept as an alias that still works and warns (module docstring)."""
    p.add_argument(name, deprecated, dest="config", required=True, type=Path, metavar="FILE",
                   action=_DeprecatedAlias, deprecated=deprecated,
                   help=f"{help} ({deprecated} is a deprecated alias)")


def add_run_args(p: argparse.ArgumentParser, command: str, resume: bool = True) -> None:
    """``--out DIR`` (and ``--resume RUN_DIR``) with the one meaning every job gives them.

    Args:
        p: the subcommand's parser.
        command: the subcommand, as it appears in the default folder name.
        resume: add ``--resume``.
    """
    p.add_argument("--out", default=None, metavar="DIR",
                   help=f"run folder to write (default: <logging.run_dir>/<name>-{command}-<time>)")
    if resume:
        p.add_argument("--resume", default=None, metavar="RUN_DIR",
                       help="continue this run folder after its last complete step, with its own config.yaml "
                            "(no --config or --set)")


def output_folder(out: str | None, run_dir: str, name: str, command: str) -> Path:
    """``--out`` when given, else a new ``<run_dir>/<name>-<command>-<time>`` (fedpanfm/run_folder.py).

    Args:
        out: the ``--out`` argument (None: not given).
        run_dir: ``cfg.logging.run_dir``.
        name: the experiment name (``cfg.name``).
        command: the subcommand, e.g. ``"pretrain"``.
    """
    from fedpanfm.run_folder import new_run_folder

    return Path(out) if out else new_run_folder(run_dir, name, command)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_in(argv)
    parser = build_parser([command] if command else [])
    args = parser.parse_args(argv)
    from fedpanfm.config import ConfigError
    from fedpanfm.run_log import configure

    configure(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"fedpanfm: config error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"fedpanfm: error: {exc}", file=sys.stderr)
        return 1


__all__ = ["Parser", "add_config_args", "add_file_option", "add_run_args", "build_parser", "main", "output_folder", "plain", "static_help"]

if __name__ == "__main__":
    sys.exit(main())

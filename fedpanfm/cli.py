"""The ``fedpanfm`` command.

Subcommands are plugins registered under the ``fedpanfm.cli`` entry-point group
(pyproject.toml): each entry is a ``register(subparsers)`` callable that adds one subcommand
and sets ``func`` on it. This keeps the library free of imports from ``sites`` and
``orchestration`` while one command reaches all of them.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

from fedpanfm import __version__
from fedpanfm.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpanfm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fedpanfm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for ep in sorted(entry_points(group="fedpanfm.cli"), key=lambda e: e.name):
        try:
            register = ep.load()
        except ImportError as exc:
            # One broken plugin must not take the other subcommands down with it.
            print(f"fedpanfm: subcommand {ep.name!r} unavailable: {exc}", file=sys.stderr)
            continue
        register(sub)
    return parser


def add_config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    """The ``--config FILE`` and repeatable ``--set KEY=VALUE`` options every job takes."""
    p.add_argument("--config", required=required, help="experiment YAML (configs/*.yaml)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set model.depth=4 (repeatable)",
    )


def output_folder(out: str | None, run_dir: str, name: str, command: str) -> Path:
    """``--out`` when given, else ``<run_dir>/<name>_<command>_<time>`` (a fresh folder per run).

    Args:
        out: the ``--out`` argument (None: not given).
        run_dir: ``cfg.logging.run_dir``.
        name: the experiment name (``cfg.name``).
        command: the subcommand, e.g. ``"pretrain"``.
    """
    return Path(out) if out else Path(run_dir) / f"{name}_{command}_{time.strftime('%Y%m%d-%H%M%S')}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
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


if __name__ == "__main__":
    sys.exit(main())

"""``fedpanfm pretrain``: centralized pre-training over a cohort's pooled sites."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedpanfm.cli import add_config_args, output_folder
from fedpanfm.config import load_config


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``pretrain`` subcommand to the ``fedpanfm`` parser.

    Args:
        subparsers: the ``fedpanfm`` command's sub-parser collection.
    """
    p = subparsers.add_parser(
        "pretrain",
        help="centralized pre-training over all sites' subjects pooled (the baseline)",
        description=__doc__,
    )
    add_config_args(p, required=True)
    p.add_argument("--cohort", required=True, help="existing cohort folder (site folders below it)")
    p.add_argument("--out", default=None, help="run folder (default: <logging.run_dir>/<name>-pretrain-<time>)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    # Imported here so `fedpanfm --help` does not pay for torch / deepspeed.
    from fedpanfm.train.pretrain import run_pretrain

    cfg = load_config(args.config, args.overrides)
    out = output_folder(args.out, cfg.logging.run_dir, cfg.name, "pretrain")
    summary = run_pretrain(cfg, Path(args.cohort), out)
    print(f"train subjects {summary.train_subjects}, val subjects {summary.val_subjects}, "
          f"epochs {summary.epochs}, steps {summary.steps}")
    return 0

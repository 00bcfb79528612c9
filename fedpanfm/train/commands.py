"""``fedpanfm pretrain``: centralized pre-training over a cohort's pooled sites.

The run folder gets run.log, command.txt and environment.json as every job's does
(fedpanfm/run_folder.py); ``--resume RUN_DIR`` continues a run after its last complete epoch,
with the config stored in its checkpoint.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fedpanfm.cli import add_config_args, add_run_args, output_folder

log = logging.getLogger("fedpanfm.pretrain")


def _echo(message: str) -> None:
    """A progress line on the console and in run.log."""
    print(message, flush=True)
    log.info("%s", message)


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
    add_config_args(p)
    p.add_argument("--cohort", default=None,
                   help="existing cohort folder (site folders below it); with --resume: the run's own by default")
    add_run_args(p, "pretrain")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    # Imported here so `fedpanfm --help` does not pay for torch / deepspeed.
    from fedpanfm.config import load_config
    from fedpanfm.run_folder import record_provenance
    from fedpanfm.run_log import run_log_file
    from fedpanfm.train.pretrain import resume_point, run_pretrain

    if args.resume is not None:
        if args.config or args.overrides or args.out:
            raise SystemExit("fedpanfm pretrain --resume RUN_DIR: the run keeps its folder and config; "
                             "drop --config/--set/--out")
        out = Path(args.resume)
        _, _, cfg, meta = resume_point(out)
        cohort = Path(args.cohort or meta.get("cohort") or cfg.cohort)
    else:
        if args.config is None or args.cohort is None:
            raise SystemExit("fedpanfm pretrain: --config and --cohort are required (or --resume RUN_DIR)")
        cfg = load_config(args.config, args.overrides)
        out = output_folder(args.out, cfg.logging.run_dir, cfg.name, "pretrain")
        cohort = Path(args.cohort)
    with run_log_file(out):
        record_provenance(out, cfg.device)
        summary = run_pretrain(cfg, cohort, out, echo=_echo, resume=args.resume is not None)
    print(f"train subjects {summary.train_subjects}, val subjects {summary.val_subjects}, "
          f"epochs {summary.epochs}, steps {summary.steps}")
    return 0

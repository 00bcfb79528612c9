"""``fedpanfm study``: the SGM study on the synthetic cohort (docs/results.md)."""

from __future__ import annotations

import argparse
import shlex
import sys

from fedpanfm.cli import add_config_args, output_folder


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``study`` subcommand to the ``fedpanfm`` parser.

    Args:
        subparsers: the ``fedpanfm`` command's sub-parser collection.
    """
    p = subparsers.add_parser(
        "study",
        help="the SGM study: random init, best single site, centralized, federated none/random/sgm, sgm without DEX, "
             "and the baseline rows",
        description=__doc__,
    )
    add_config_args(p, required=True)
    p.add_argument("--quick", action="store_true",
                   help="apply the config's evaluation.study.quick overrides (a small study, under 10 minutes on 2 cores)")
    p.add_argument("--out", default=None, help="study folder (default: <logging.run_dir>/<name>-study-<time>)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    # Imported here so `fedpanfm --help` does not pay for torch.
    from fedpanfm.config import load_config
    from fedpanfm.evaluation.study import Study
    from fedpanfm.evaluation.study_report import check_targets, markdown_table, summarise, write_study

    cfg = load_config(args.config, args.overrides)
    if args.quick:
        cfg = load_config(args.config, [*cfg.evaluation.study.quick, *args.overrides])
    out = output_folder(args.out, cfg.logging.run_dir, cfg.name, "study")
    study = Study(cfg, out, echo=lambda m: print(m, flush=True))
    runs = study.run()
    command = "fedpanfm " + shlex.join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("fedpanfm") else \
        "fedpanfm study " + shlex.join(["--config", args.config, *(["--quick"] if args.quick else []), "--out", str(out),
                                         *[x for o in args.overrides for x in ("--set", o)]])
    paths = write_study(runs, study.out, study.budget, study.seconds, study.single_site_choice, command,
                        study.reference, study.baselines, study.cfg.to_dict())
    table = summarise(runs)
    print("\n" + markdown_table(table))
    for t in check_targets(runs):
        print(f"  [{t.verdict.replace('**', '').upper()}] seed {t.seed}: {t.claim}: {t.detail}")
    print(f"study done in {study.seconds['total']:.0f}s; results: {paths['results.md']}, {paths['study-latest.json']}")
    return 0

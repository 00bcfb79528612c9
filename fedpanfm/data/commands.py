"""``fedpanfm cohort synth`` (write the synthetic cohort), ``inspect`` and ``preview``."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedpanfm.cli import add_config_args
from fedpanfm.config import load_config


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``cohort`` subcommand (``synth``, ``inspect``, ``preview``) to the ``fedpanfm`` parser.

    Args:
        subparsers: the top-level parser's sub-parser collection.
    """
    cohort = subparsers.add_parser("cohort", help="make or inspect a cohort of site folders")
    sub = cohort.add_subparsers(dest="cohort_command", metavar="ACTION", required=True)

    synth = sub.add_parser("synth", help="write the synthetic multi-site cohort")
    synth.add_argument("--out", required=True, type=Path, help="cohort folder to write (site folders below it)")
    synth.add_argument("--sites", type=int, help="number of sites (synth.sites)")
    synth.add_argument("--subjects", type=int, help="subjects per site (synth.subjects)")
    synth.add_argument("--seed", type=int, help="generator seed (synth.seed)")
    add_config_args(synth)
    synth.set_defaults(func=run_synth)

    inspect = sub.add_parser("inspect", help="validate a cohort or one site and print what it holds")
    inspect.add_argument("dir", type=Path, help="a cohort folder of site folders, or one site folder")
    add_config_args(inspect)
    inspect.set_defaults(func=run_inspect)

    preview = sub.add_parser(
        "preview", help="write what the model sees from one site: arrays, PNG mosaics, a before/after table"
    )
    preview.add_argument("site_dir", type=Path, help="one site folder (manifest.csv and its images)")
    preview.add_argument("--out", required=True, type=Path, help="folder for <subject>/<organ>.npy, mosaics, table")
    add_config_args(preview)
    preview.set_defaults(func=run_preview)


def run_synth(args: argparse.Namespace) -> int:
    """Generate the synthetic cohort; ``--sites/--subjects/--seed`` override ``synth.*``."""
    from fedpanfm.data.synthetic import generate_cohort

    overrides = list(args.overrides)
    for key, value in (("sites", args.sites), ("subjects", args.subjects), ("seed", args.seed)):
        if value is not None:
            overrides.append(f"synth.{key}={value}")
    cfg = load_config(args.config, overrides)
    sites = generate_cohort(args.out, cfg)
    print(f"wrote {len(sites)} site(s) x {cfg.synth.subjects} subject(s) under {args.out}")
    for s in sites:
        print(f"  {s}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    """Validate every site of ``args.dir`` and print per-site and total tables."""
    from fedpanfm.data.dataset import is_site, list_sites
    from fedpanfm.data.summary import format_summary, summarize_site

    cfg = load_config(args.config, args.overrides)
    sites = [args.dir] if is_site(args.dir) else list_sites(args.dir)
    print(format_summary([summarize_site(s, cfg) for s in sites]))
    return 0


def run_preview(args: argparse.Namespace) -> int:
    """Preprocess one site folder into ``--out`` and print its per-organ summary."""
    from fedpanfm.data.preview import TABLE_NAME, format_preview, preview_site

    cfg = load_config(args.config, args.overrides)
    rows = preview_site(args.site_dir, cfg, args.out)
    print(format_preview(args.site_dir.name, rows))
    print(f"arrays and mosaics under {args.out}, one row per image in {args.out / TABLE_NAME}")
    return 0

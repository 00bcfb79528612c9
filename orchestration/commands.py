"""``fedpanfm simulate``: the federation on one machine (a plugin of the ``fedpanfm`` command)."""

from __future__ import annotations

import argparse

from fedpanfm.cli import add_config_args, add_run_args


def register_simulate(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``simulate`` subcommand.

    Args:
        subparsers: the ``fedpanfm`` command's subparsers.
    """
    p = subparsers.add_parser(
        "simulate",
        help="run the federation in simulation (synthetic cohort generated if absent)",
        description="Run the ServerApp and one ClientApp per site in Flower's simulation runtime. "
        "The same apps run with `flwr run .` (pyproject.toml [tool.flwr.app]). The console shows a progress "
        "bar over rounds and one line per round; everything else goes to <run folder>/run.log (-v: also here).",
    )
    add_config_args(p, required=False)
    add_run_args(p, "simulate")
    p.add_argument("--cpus", type=int, default=None,
                   help="CPUs of the private local Ray: sites that train at once (default: all cores)")
    p.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="run on this Ray cluster (auto, host:port, ray://host:port) instead of "
                        "federation.ray.address; '' = a private local Ray (docs/scale-out.md)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from fedpanfm.console import live_rounds
    from orchestration.server_app import summary_text
    from orchestration.simulate import simulate

    if args.resume is None and args.config is None:
        raise SystemExit("fedpanfm simulate: --config is required (or --resume RUN_DIR)")
    if args.resume is not None and (args.config or args.out):
        raise SystemExit("fedpanfm simulate --resume RUN_DIR: the run keeps its folder and config; drop --config/--out")
    with live_rounds():
        summary = simulate(args.config, args.overrides, run_folder=args.out, cpus=args.cpus, resume=args.resume,
                           ray_address=args.ray_address)
    print("\n" + summary_text(summary), flush=True)
    return 0

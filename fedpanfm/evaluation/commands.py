"""``fedpanfm evaluate``: probe AUROC, missing-organ robustness and attention balance of a checkpoint."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fedpanfm.cli import add_config_args, output_folder

RANDOM = "random"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` subcommand to the ``fedpanfm`` parser.

    Args:
        subparsers: the ``fedpanfm`` command's sub-parser collection.
    """
    p = subparsers.add_parser(
        "evaluate",
        help="linear-probe AUROC, missing-organ robustness and attention balance of a frozen encoder",
        description=__doc__,
    )
    p.add_argument("--checkpoint", required=True,
                   help=f"checkpoint folder (its teacher encoder is evaluated), or '{RANDOM}' for a randomly "
                        "initialised encoder of --config's architecture")
    p.add_argument("--random-init", action="store_true",
                   help="use the checkpoint's architecture and config with random weights (the random-encoder baseline)")
    p.add_argument("--cohort", required=True, help="labelled cohort folder (site folders below it; pooled)")
    p.add_argument("--out", default=None,
                   help="output folder (default: <logging.run_dir>/<name>-evaluate-<time>)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the split, bootstrap, random organ draws and random init (default: the config's seed)")
    add_config_args(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    # Imported here so `fedpanfm --help` does not pay for torch.
    from fedpanfm.checkpoint import CheckpointError
    from fedpanfm.config import load_config
    from fedpanfm.data.dataset import pooled_dataset
    from fedpanfm.evaluation.embed import collate_dataset, encoder_from_checkpoint, random_encoder
    from fedpanfm.evaluation.factors import load_cohort_factors
    from fedpanfm.evaluation.report import evaluate_encoder, write_report
    from fedpanfm.train.distributed import pick_device

    t0 = time.perf_counter()
    if args.checkpoint == RANDOM:
        cfg = load_config(args.config, args.overrides)
        seed = cfg.seed if args.seed is None else args.seed
        encoder = random_encoder(cfg, seed)
        label = "random-initialised encoder"
    else:
        if args.config:
            raise ValueError(
                f"--config {args.config}: a checkpoint carries its own config ({args.checkpoint}/config.yaml); "
                "change data or evaluation keys with --set"
            )
        seed = args.seed
        try:
            encoder, cfg = encoder_from_checkpoint(Path(args.checkpoint), args.overrides, args.random_init,
                                                   seed if seed is not None else 0)
        except CheckpointError as exc:  # the CLI reports ValueErrors as one clean line
            raise ValueError(str(exc)) from None
        if seed is None:
            seed = cfg.seed
        label = f"{args.checkpoint}" + (" (architecture only, random weights)" if args.random_init else "")
    device = pick_device(cfg.device)
    encoder.to(device)
    out = output_folder(args.out, cfg.logging.run_dir, cfg.name, "evaluate")
    batches = collate_dataset(pooled_dataset(Path(args.cohort), cfg), cfg)
    result = evaluate_encoder(encoder, cfg, batches, seed, device, load_cohort_factors(Path(args.cohort)))
    result.meta.update({"checkpoint": label, "cohort": str(args.cohort), "total_seconds": round(time.perf_counter() - t0, 2)})
    paths = write_report(result, out, title=f"Evaluation of {label}")
    sc = result.scores
    print(f"evaluated {label} on {result.meta['subjects']} subjects (test {result.meta['test']}): "
          f"macro AUROC {sc.macro:.3f} [{sc.macro_ci_low:.3f}, {sc.macro_ci_high:.3f}] over {sc.n_macro_labels} label(s), "
          f"attention entropy {result.balance.entropy:.3f}, {result.meta['total_seconds']:.1f}s")
    if result.factors is not None:
        print(f"latent factors: mean R^2 {result.factors.signal_r2:.3f} over the factors labels read, "
              f"participation ratio {result.factors.participation_ratio:.2f}")
    print(f"report: {paths['report.md']}; TensorBoard: tensorboard --logdir {out}")
    return 0

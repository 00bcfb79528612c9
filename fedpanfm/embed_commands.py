"""``fedpanfm embed``: a cohort's CLS and per-organ embeddings under a checkpoint, as one .npz."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``embed`` subcommand to the ``fedpanfm`` parser.

    Args:
        subparsers: the ``fedpanfm`` command's sub-parser collection.
    """
    p = subparsers.add_parser(
        "embed",
        help="export a cohort's CLS and per-organ embeddings under a checkpoint's frozen encoder (.npz)",
        description="Encode every subject of a cohort with a checkpoint's teacher encoder and write one .npz "
                    "(subject_ids, sites, cls, organ, present, attention, labels, organ_names, label_names); "
                    "read it with numpy.load.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (e.g. <run>/checkpoints/best)")
    p.add_argument("--cohort", required=True, help="cohort folder (site folders below it)")
    p.add_argument("--out", required=True, metavar="FILE", help="the .npz file to write")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the checkpoint's config, e.g. --set device=cuda (repeatable)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    # Imported here so `fedpanfm --help` does not pay for torch.
    from fedpanfm.checkpoint import CheckpointError
    from fedpanfm.embed_export import export_embeddings

    try:
        done = export_embeddings(args.checkpoint, args.cohort, args.out, args.overrides)
    except CheckpointError as exc:  # the CLI reports ValueErrors as one clean line
        raise ValueError(str(exc)) from None
    print(f"wrote {done['path']}: {done['subjects']} subjects, CLS and per-organ embeddings of dimension "
          f"{done['dim']} over {done['organs']} organs, {done['labels']} label column(s)")
    return 0

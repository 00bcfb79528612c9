"""Centralized pre-training: every site's subjects pooled into one training set (the baseline
the federation is compared with).

Each site's subjects are split into train / validation with the same ``split_subjects`` rule
(``cfg.data.val_fraction``, ``cfg.seed``) a federated site uses, so the centralized baseline
trains on exactly the union of what the sites train on and validates on the union of their
held-out subjects.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import ConcatDataset

from fedpanfm.checkpoint import point_latest, save_checkpoint
from fedpanfm.config import ExperimentConfig
from fedpanfm.data.collate import make_loader
from fedpanfm.data.dataset import SiteDataset, list_sites, split_subjects
from fedpanfm.tb import RunLogger
from fedpanfm.train.engine import FitResult, LocalTrainer


@dataclass
class PretrainSummary:
    """What a centralized pre-training run produced.

    Args:
        run_dir: the run folder (TensorBoard sub-run ``pretrain``, ``checkpoints/``).
        checkpoint: the last epoch's checkpoint folder (``checkpoints/latest`` points at it).
        epochs: epochs trained.
        steps: optimizer steps taken.
        train_subjects: subjects trained on (all sites).
        val_subjects: held-out subjects (all sites).
        metrics: the last epoch's mean training metrics.
        val_metrics: the last epoch's validation losses ({} without validation subjects).
        seconds: wall time.
    """

    run_dir: Path
    checkpoint: Path
    epochs: int
    steps: int
    train_subjects: int
    val_subjects: int
    metrics: dict[str, float]
    val_metrics: dict[str, float]
    seconds: float


def pooled_split(cohort_dir: Path, cfg: ExperimentConfig) -> tuple[ConcatDataset, ConcatDataset | None]:
    """Every site's train subjects pooled, and their validation subjects pooled (None if none).

    Args:
        cohort_dir: the cohort folder (site folders below it); it must already exist.
        cfg: the experiment config (``data.val_fraction``, ``seed``).
    """
    cohort_dir = Path(cohort_dir)
    if not cohort_dir.is_dir():
        raise FileNotFoundError(
            f"cohort folder {cohort_dir} not found: pretrain generates nothing; create the cohort "
            "first (e.g. `fedpanfm cohort synth`) or point --cohort at one"
        )
    train, val = [], []
    for site in list_sites(cohort_dir):
        full = SiteDataset(site, cfg)  # validates every file once; the splits are views of it
        tr, va = split_subjects(full.subject_ids, cfg.data.val_fraction, cfg.seed)
        train.append(full.subset(tr))
        if va:
            val.append(full.subset(va))
    return ConcatDataset(train), (ConcatDataset(val) if val else None)


def expert_usage_scalars(gate_mass: torch.Tensor) -> dict[str, float]:
    """``expert_usage/layer<l>/e<e>``: each DEX layer's gate mass as shares over its experts
    (layers that routed nothing, e.g. plain-MLP blocks, are left out)."""
    out: dict[str, float] = {}
    for layer, row in enumerate(gate_mass):
        total = float(row.sum())
        if total <= 0:
            continue
        for e, mass in enumerate(row.tolist()):
            out[f"expert_usage/layer{layer}/e{e}"] = mass / total
    return out


def _flat_hparams(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            if key.startswith("data.organs"):
                continue  # per-organ grids: many keys, rarely compared across runs
            out.update(_flat_hparams(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


def _step_tags(values: dict[str, float]) -> dict[str, float]:
    # A metric without a group (the total "loss") becomes "<name>/total" so TensorBoard shows it
    # in one panel with loss/dino, loss/ibot ...
    return {k if "/" in k else f"{k}/total": v for k, v in values.items()}


def run_pretrain(
    cfg: ExperimentConfig,
    cohort_dir: Path,
    run_dir: Path,
    echo: Callable[[str], None] = print,
) -> PretrainSummary:
    """Train ``cfg.train.epochs`` epochs on the pooled cohort, logging and checkpointing each epoch.

    Args:
        cfg: the experiment config.
        cohort_dir: an existing cohort folder.
        run_dir: where TensorBoard events (``pretrain/``) and ``checkpoints/epoch_<k>`` go; must
            not already hold a pretrain run.
        echo: where the one-line progress and summary messages go.
    """
    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    if (run_dir / "pretrain").exists() or ckpt_root.exists():
        raise ValueError(f"run folder {run_dir} already holds a pretrain run; choose another --out")
    t0 = time.perf_counter()
    train_ds, val_ds = pooled_split(cohort_dir, cfg)
    loader = make_loader(train_ds, cfg, shuffle=True, seed=cfg.seed)
    val_loader = make_loader(val_ds, cfg, shuffle=False, seed=cfg.seed) if val_ds is not None else None
    epochs = cfg.train.epochs
    total_steps = max(1, (epochs * len(loader)) // cfg.deepspeed.gradient_accumulation_steps)
    # A fresh trainer, not the process cache: pre-training starts from the seeded initialisation.
    trainer = LocalTrainer(cfg)
    echo(f"pretrain: {len(train_ds)} train / {len(val_ds) if val_ds else 0} val subjects, "
         f"{epochs} epochs, {total_steps} steps, device {trainer.device}")
    last: FitResult | None = None
    val_metrics: dict[str, float] = {}
    checkpoint = ckpt_root / "epoch_0"
    with RunLogger(run_dir, "pretrain") as tb:
        def on_step(step: int, values: dict[str, float]) -> None:
            tb.scalars(_step_tags(values), step)

        for epoch in range(1, epochs + 1):
            last = trainer.fit(loader, epochs=1, total_steps=total_steps, on_step=on_step)
            val_metrics = trainer.evaluate(val_loader) if val_loader is not None else {}
            step = trainer.step
            per_epoch = {k: v for k, v in last.metrics.items() if k.startswith(("saliency/", "mask_rate/"))}
            per_epoch.update(expert_usage_scalars(last.gate_mass))
            per_epoch.update({f"val/{k}": v for k, v in _step_tags(val_metrics).items()})
            per_epoch["epoch"] = float(epoch)
            tb.scalars(per_epoch, step)
            tb.flush()
            checkpoint = save_checkpoint(
                ckpt_root / f"epoch_{epoch}",
                trainer.export_state(),
                cfg,
                {
                    "kind": "pretrain",
                    "epoch": epoch,
                    "schedule": trainer.schedule_state(),
                    "train_metrics": last.metrics,
                    "val_metrics": val_metrics,
                    "train_subjects": last.subjects,
                },
            )
            point_latest(ckpt_root / "latest", checkpoint)
            loss = last.metrics.get("loss", float("nan"))
            echo(f"epoch {epoch}/{epochs}: step {step}, train loss {loss:.4f}"
                 + (f", val loss {val_metrics['loss']:.4f}" if "loss" in val_metrics else "")
                 + f", {last.seconds:.1f}s")
        assert last is not None  # epochs >= 1 by config
        final = {f"final/train_{k}": v for k, v in last.metrics.items() if "/" not in k}
        final.update({f"final/val_{k}": v for k, v in val_metrics.items() if "/" not in k})
        tb.hparams(_flat_hparams(cfg.to_dict()), {k: v for k, v in final.items() if math.isfinite(v)})
    summary = PretrainSummary(
        run_dir=run_dir,
        checkpoint=checkpoint,
        epochs=epochs,
        steps=trainer.step,
        train_subjects=len(train_ds),
        val_subjects=len(val_ds) if val_ds is not None else 0,
        metrics=last.metrics,
        val_metrics=val_metrics,
        seconds=time.perf_counter() - t0,
    )
    echo(f"pretrain done in {summary.seconds:.1f}s: {summary.steps} steps; checkpoint {summary.checkpoint}; "
         f"TensorBoard: tensorboard --logdir {run_dir}")
    return summary


__all__ = ["PretrainSummary", "expert_usage_scalars", "pooled_split", "run_pretrain"]

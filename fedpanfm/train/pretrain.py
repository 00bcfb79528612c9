"""Centralized pre-training: every site's subjects pooled into one training set (the baseline
the federation is compared with).

Each site's subjects are split into train / validation with the same ``split_subjects`` rule
(``cfg.data.val_fraction``, ``cfg.seed``) a federated site uses, so the centralized baseline
trains on exactly the union of what the sites train on and validates on the union of their
held-out subjects.

Resuming (``fedpanfm pretrain --resume RUN_DIR``): every checkpoint (every
``train.checkpoint_every`` epochs and the last) holds, beside the
model, what training needs to continue exactly as if it had not stopped: the AdamW moments, the
schedule position, torch's global RNG (masking, views) and the shuffling generator of the
loader, in ``trainer_state.safetensors`` (tensors only, no pickle; its SHA-256 is in the
checkpoint's ``meta.json``). A resumed run continues after the last checkpoint; its
TensorBoard continues at the next step (events the interrupted epoch wrote are hidden). On CPU
the result equals the uninterrupted run's to float rounding (tests/train/test_pretrain_resume.py:
max |difference| <= 1e-6).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import ConcatDataset

from fedpanfm.checkpoint import CheckpointError, load_checkpoint, point_latest, read_checkpoint_file, save_checkpoint
from fedpanfm.config import ExperimentConfig, config_from_dict
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


#: The file beside an epoch's weights that lets the run continue exactly (module docstring).
TRAINER_STATE = "trainer_state.safetensors"


def _trainer_state(trainer: LocalTrainer, loader: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, JSON-able meta) of the optimiser moments and both RNG states."""
    opt = trainer._base_optimizer().state_dict()
    tensors: dict[str, torch.Tensor] = {"rng/torch": torch.get_rng_state(), "rng/loader": loader.generator.get_state()}
    for idx, entry in opt["state"].items():
        for name, value in entry.items():
            tensors[f"optim/{idx}/{name}"] = torch.as_tensor(value).detach().cpu().contiguous().clone()
    return tensors, {"param_groups": opt["param_groups"]}


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors)


def _restore_trainer_state(ckpt: Path, meta: dict[str, Any], trainer: LocalTrainer, loader: Any) -> None:
    """Put the moments and RNG states saved with ``ckpt`` back (raises CheckpointError when absent
    or changed)."""
    from safetensors.torch import load

    if not (ckpt / TRAINER_STATE).is_file():
        raise CheckpointError(f"{ckpt}: no {TRAINER_STATE}: this checkpoint cannot be resumed exactly")
    tensors = load(read_checkpoint_file(ckpt, TRAINER_STATE))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = value
    opt = trainer._base_optimizer()
    opt.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    torch.set_rng_state(tensors["rng/torch"])
    loader.generator.set_state(tensors["rng/loader"])


def resume_point(run_dir: Path) -> tuple[Path, dict[str, torch.Tensor], ExperimentConfig, dict[str, Any]]:
    """(checkpoint folder, weights, config, meta) of the last complete epoch of a pretrain run.

    Raises:
        FileNotFoundError: no ``checkpoints/latest`` in ``run_dir``.
    """
    latest = Path(run_dir) / "checkpoints" / "latest"
    if not latest.exists():
        raise FileNotFoundError(f"pretrain --resume {run_dir}: no checkpoints/latest (no epoch completed there)")
    ckpt = latest.resolve()
    state, cfg_dict, meta = load_checkpoint(ckpt)
    if meta.get("kind") != "pretrain":
        raise ValueError(f"pretrain --resume {run_dir}: {ckpt} is a {meta.get('kind', 'unknown')!r} checkpoint")
    return ckpt, state, config_from_dict(cfg_dict, str(ckpt / "config.yaml")), meta


def run_pretrain(
    cfg: ExperimentConfig,
    cohort_dir: Path,
    run_dir: Path,
    echo: Callable[[str], None] = print,
    resume: bool = False,
) -> PretrainSummary:
    """Train ``cfg.train.epochs`` epochs on the pooled cohort, logging each epoch; validating and
    checkpointing every ``cfg.train.checkpoint_every`` epochs and after the last.

    Args:
        cfg: the experiment config (with ``resume``: the checkpoint's; see :func:`resume_point`).
        cohort_dir: an existing cohort folder.
        run_dir: where TensorBoard events (``pretrain/``) and ``checkpoints/epoch_<k>`` go; must
            not already hold a pretrain run unless ``resume``.
        echo: where the one-line progress and summary messages go.
        resume: continue the run in ``run_dir`` after its last complete epoch (module docstring).
    """
    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    if not resume and ((run_dir / "pretrain").exists() or ckpt_root.exists()):
        raise ValueError(f"run folder {run_dir} already holds a pretrain run; choose another --out (or --resume it)")
    t0 = time.perf_counter()
    train_ds, val_ds = pooled_split(cohort_dir, cfg)
    loader = make_loader(train_ds, cfg, shuffle=True, seed=cfg.seed)
    val_loader = make_loader(val_ds, cfg, shuffle=False, seed=cfg.seed) if val_ds is not None else None
    epochs = cfg.train.epochs
    total_steps = max(1, (epochs * len(loader)) // cfg.deepspeed.gradient_accumulation_steps)
    # A fresh trainer, not the process cache: pre-training starts from the seeded initialisation.
    trainer = LocalTrainer(cfg)
    first, purge = 1, None
    checkpoint = ckpt_root / "epoch_0"
    if resume:
        checkpoint, state, _, meta = resume_point(run_dir)
        trainer.load_state(state)
        trainer.set_schedule_state(meta["schedule"])
        _restore_trainer_state(checkpoint, meta, trainer, loader)
        # The last epoch's summary scalars share their step with the next epoch's first step, whose
        # events an interrupted epoch may have written: that step is purged and the summary rewritten.
        first, purge = int(meta["epoch"]) + 1, trainer.step
        if first > epochs:
            raise ValueError(f"pretrain --resume {run_dir}: all {epochs} epochs are done already")
        echo(f"pretrain: resuming {run_dir} after epoch {first - 1} (step {trainer.step})")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
    echo(f"pretrain: {len(train_ds)} train / {len(val_ds) if val_ds else 0} val subjects, "
         f"{epochs} epochs, {total_steps} steps, device {trainer.device}")
    last: FitResult | None = None
    val_metrics: dict[str, float] = {}
    with RunLogger(run_dir, "pretrain", purge_step=purge) as tb:
        def on_step(step: int, values: dict[str, float]) -> None:
            tb.scalars(_step_tags(values), step)

        if resume:
            tb.scalars(meta.get("epoch_scalars", {}), trainer.step)

        for epoch in range(first, epochs + 1):
            last = trainer.fit(loader, epochs=1, total_steps=total_steps, on_step=on_step)
            # A small site's epoch is a few steps: validating and checkpointing after every one
            # cost as much as a fifth of its training and ~0.5 GB of checkpoints per run.
            due = epoch == epochs or epoch % cfg.train.checkpoint_every == 0
            val_metrics = trainer.evaluate(val_loader) if due and val_loader is not None else {}
            step = trainer.step
            per_epoch = {k: v for k, v in last.metrics.items() if k.startswith(("saliency/", "mask_rate/"))}
            per_epoch.update(expert_usage_scalars(last.gate_mass))
            per_epoch.update({f"val/{k}": v for k, v in _step_tags(val_metrics).items()})
            per_epoch["epoch"] = float(epoch)
            tb.scalars(per_epoch, step)
            tb.flush()
            loss = last.metrics.get("loss", float("nan"))
            echo(f"epoch {epoch}/{epochs}: step {step}, train loss {loss:.4f}"
                 + (f", val loss {val_metrics['loss']:.4f}" if "loss" in val_metrics else "")
                 + f", {last.seconds:.1f}s")
            if not due:
                continue
            # The trainer state is written (and checksummed) with the checkpoint, so "latest" only
            # ever points at an epoch that can be resumed.
            resume_tensors, resume_meta = _trainer_state(trainer, loader)
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
                    "cohort": str(Path(cohort_dir).resolve()),
                    "epoch_scalars": {k: v for k, v in per_epoch.items() if math.isfinite(v)},
                    "optimizer": json.loads(json.dumps(resume_meta)),
                },
                extra_files={TRAINER_STATE: _tensor_bytes(resume_tensors)},
            )
            point_latest(ckpt_root / "latest", checkpoint)
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


__all__ = ["PretrainSummary", "TRAINER_STATE", "expert_usage_scalars", "pooled_split", "resume_point", "run_pretrain"]

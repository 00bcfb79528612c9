"""The study's upper reference: the study encoder trained *supervised* on the latent factors.

Our design, not the papers': an encoder that is *told what matters*. A fresh
:class:`PanOrganEncoder` plus a linear head from its CLS embedding regresses, by mean squared
error, the standardised latent factors the synthetic cohort's labels read (each site's
``factors.csv``, :func:`fedpanfm.evaluation.factors.load_cohort_factors`), on the study's training
subjects, for at least ``evaluation.study.supervised_epochs`` epochs (the study passes the larger of
that and the arms' step budget: trained on 96 subjects the reference looked like +0.028 of headroom,
on 768 it reached 0.744, issue 14). Its linear-probe AUROC is roughly the most this architecture can
give a probe on this cohort, so ``supervised_factors - random_init`` is the headroom the study's
targets sit in. It is a reference line of the study, NOT an arm of the comparison: no
self-supervised method could see these factors, and real cohorts have none.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedpanfm.augment import OrganAugmenter
from fedpanfm.config import ExperimentConfig
from fedpanfm.data.collate import make_loader
from fedpanfm.data.dataset import SiteDataset
from fedpanfm.evaluation.embed import organ_token_means
from fedpanfm.evaluation.factors import label_factor_names, load_cohort_factors
from fedpanfm.model.encoder import EncoderOutput, PanOrganEncoder
from fedpanfm.model.views import augment_batch
from fedpanfm.train.pretrain import pooled_split

#: AdamW learning rate of the reference (our choice: the rate the throw-away headroom runs used,
#: which fit the factors well within the study's step budget on the study's tiny encoder).
LEARNING_RATE: float = 1e-3


def _readout_features(out: EncoderOutput, readout: str, n_organs: int) -> torch.Tensor:
    """What the head regresses from: the study's primary readout (the probes read the same)."""
    if readout == "cls":
        return out.cls  # no per-organ means to compute on the training path
    means = organ_token_means(out.tokens, out.organ_id, out.pad, n_organs).flatten(1)
    return {"cls": out.cls, "organ_mean": means, "both": torch.cat([out.cls, means], dim=1)}[readout]


def train_factor_encoder(cfg: ExperimentConfig, cohort_dir: Path, steps: int, seed: int) -> PanOrganEncoder:
    """An encoder trained to regress the latent factors the labels read (the upper reference).

    Training subjects are every site's subjects after its validation hold-out, split exactly as
    ``run_pretrain`` splits them (``pooled_split``: ``split_subjects`` with ``data.val_fraction``
    and ``cfg.seed``). Each factor is standardised by its mean / std over those subjects. One
    optimiser step per batch of ``data.batch_size`` subjects (no gradient accumulation), AdamW
    (lr :data:`LEARNING_RATE`, torch's default weight decay), MSE between a linear head on the
    study's primary readout (``evaluation.study.primary_readout``: the CLS, the per-organ mean
    tokens, or both, what the probes then read) and the standardised factors; batches cycle over the training subjects, reshuffled every
    epoch with ``seed``, for exactly ``steps`` steps (the last epoch may stop part-way). Every
    batch is augmented with the self-supervised arms' own per-organ augmentations
    (``train.augment``, when enabled): without them the encoder memorised the training subjects'
    poses and its factor R^2 on new subjects fell from 0.4-0.7 to 0.1-0.4 (docs/results.md).

    Args:
        cfg: the experiment config (architecture, ``data.batch_size``, ``data.val_fraction``,
            ``seed`` = the split seed; the study passes its arm seed here too).
        cohort_dir: the training cohort; it must carry latent factors (a synthetic cohort).
        steps: optimiser steps to take (>= 1).
        seed: seeds the encoder and head initialisation and the per-epoch shuffling.

    Returns:
        the trained encoder, in eval mode with gradients off (the head is dropped).

    Raises:
        ValueError: ``steps < 1``, the cohort has no latent factors (a real cohort) or they name
            no factor the labels read, or a training subject has no factors (names the folder).
    """
    cohort_dir = Path(cohort_dir)
    if steps < 1:
        raise ValueError(f"train_factor_encoder: steps must be >= 1, got {steps}")
    loaded = load_cohort_factors(cohort_dir)
    if loaded is None:
        raise ValueError(f"train_factor_encoder: cohort {cohort_dir} has no latent factors (no factors.csv nor "
                         "cohort_metadata.json: a real cohort?); the supervised reference needs a synthetic cohort")
    factors = loaded[0]
    names = label_factor_names(loaded)
    if not names:
        raise ValueError(f"train_factor_encoder: cohort {cohort_dir}: the labels read no latent factor")
    train_ds, _ = pooled_split(cohort_dir, cfg)
    ids = [s for d in train_ds.datasets if isinstance(d, SiteDataset) for s in d.subject_ids]  # pooled_split's parts
    missing = [s for s in ids if s not in factors]
    if missing:
        raise ValueError(f"train_factor_encoder: cohort {cohort_dir}: no latent factors for subject(s) {missing[:5]}")
    y = torch.tensor([[factors[s][f] for f in names] for s in ids], dtype=torch.float32)
    mean, std = y.mean(0), y.std(0).clamp(min=1e-6)
    target = {s: (row - mean) / std for s, row in zip(ids, y)}

    torch.manual_seed(seed)
    encoder = PanOrganEncoder(cfg)
    readout = cfg.evaluation.study.primary_readout
    n_organs = len(cfg.data.organ_set())
    width = {"cls": cfg.model.dim, "organ_mean": n_organs * cfg.model.dim, "both": (n_organs + 1) * cfg.model.dim}[readout]
    head = torch.nn.Linear(width, len(names))
    encoder.train()
    opt = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=LEARNING_RATE)
    loader = make_loader(train_ds, cfg, shuffle=True, seed=seed)  # a new permutation every pass
    augmenter = OrganAugmenter(cfg.train.augment) if cfg.train.augment.enabled else None
    generator = torch.Generator().manual_seed(seed)
    done = 0
    while done < steps:
        for batch in loader:
            y_b = torch.stack([target[s] for s in batch.subject_ids])
            if augmenter is not None:
                batch = augment_batch(batch, augmenter, generator)
            loss = torch.nn.functional.mse_loss(head(_readout_features(encoder(batch), readout, n_organs)), y_b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                break
    encoder.requires_grad_(False)
    return encoder.eval()


__all__ = ["LEARNING_RATE", "train_factor_encoder"]

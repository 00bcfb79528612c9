"""Frozen-encoder embeddings: each subject's CLS vector and its CLS-attention share per organ.

Subjects are read and collated once (:func:`collate_dataset`); every evaluation condition
(full organs, an organ removed, k random organs removed ...) is then one pass over those batches
under ``torch.no_grad`` in eval mode, with the condition applied to each batch on the fly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import ConcatDataset

from fedpanfm.checkpoint import CheckpointError, load_checkpoint
from fedpanfm.config import ExperimentConfig, config_from_dict
from fedpanfm.data.batch import SubjectBatch
from fedpanfm.data.collate import collate_subjects, dataset_label_names
from fedpanfm.data.dataset import SiteDataset
from fedpanfm.model.encoder import PanOrganEncoder, organ_token_means
from fedpanfm.model.meta_arch import PanFMSSL
from fedpanfm.sgm import organ_attention_shares

# A condition applied to the i-th batch before encoding (e.g. organs removed).
BatchTransform = Callable[[int, SubjectBatch], SubjectBatch]


def without_organs(organs: Sequence[str]) -> BatchTransform:
    """The condition "``organs`` removed from every subject of every batch"."""
    drop = list(organs)
    return lambda _i, b: b.drop_organs(drop)


def without_per_subject(masks: Sequence[Tensor]) -> BatchTransform:
    """The condition "batch i loses the organs ``masks[i]`` marks, per subject" (``drop_per_subject``)."""
    return lambda i, b: b.drop_per_subject(masks[i])


@dataclass
class Embeddings:
    """Per-subject encoder outputs of one evaluation condition.

    Args:
        subject_ids: the N subjects encoded (subjects a condition left without organs are absent).
        cls: (N, D) float32 CLS embeddings.
        shares: (N, O) float32 share of last-layer CLS attention on each organ (rows sum to 1).
        present: (N, O) bool, organs the encoder saw for each subject.
        labels: (N, L) float32, NaN = unknown.
        label_names: the L label names.
        organ_names: the O organ names.
        organ_mean: (N, O, D) float32 mean of each organ's final tokens, zero where absent; None
            when not computed (embeddings built by hand).
        readout: what ``cls`` holds: ``"cls"`` (the CLS token) or, after
            :func:`fedpanfm.evaluation.readouts.readout`, that readout's features. The probes read
            ``cls`` whatever it holds.
    """

    subject_ids: list[str]
    cls: Tensor
    shares: Tensor
    present: Tensor
    labels: Tensor
    label_names: tuple[str, ...]
    organ_names: tuple[str, ...]
    organ_mean: Tensor | None = None
    readout: str = "cls"

    def __len__(self) -> int:
        return len(self.subject_ids)

    def rows(self, idx: Sequence[int] | Tensor) -> "Embeddings":
        """The subset of rows ``idx`` (in that order)."""
        t = torch.as_tensor(idx, dtype=torch.long)
        return Embeddings(
            subject_ids=[self.subject_ids[i] for i in t.tolist()],
            cls=self.cls[t], shares=self.shares[t], present=self.present[t], labels=self.labels[t],
            label_names=self.label_names, organ_names=self.organ_names,
            organ_mean=None if self.organ_mean is None else self.organ_mean[t], readout=self.readout,
        )

    def subset(self, subject_ids: Sequence[str]) -> "Embeddings":
        """The rows of ``subject_ids`` (in that order); an id not held raises ``KeyError``."""
        pos = {s: i for i, s in enumerate(self.subject_ids)}
        missing = [s for s in subject_ids if s not in pos]
        if missing:
            raise KeyError(f"Embeddings: subject(s) not embedded: {', '.join(missing[:10])}")
        return self.rows([pos[s] for s in subject_ids])


def encoder_from_checkpoint(
    path: Path, overrides: Sequence[str] = (), random_init: bool = False, seed: int = 0
) -> tuple[PanOrganEncoder, ExperimentConfig]:
    """The frozen teacher encoder of a checkpoint (or a random one of the same architecture).

    Args:
        path: a checkpoint folder (``fedpanfm.checkpoint.save_checkpoint``).
        overrides: ``--set KEY=VALUE`` items applied to the checkpoint's config (e.g.
            ``data.batch_size``); architecture keys must not change or loading fails.
        random_init: ignore the weights and return a freshly initialised encoder (seeded by
            ``seed``): the random-encoder baseline with the checkpoint's architecture.
        seed: initialisation seed when ``random_init``.

    Returns:
        ``(encoder in eval mode, config)``.
    """
    path = Path(path)
    state, cfg_dict, _ = load_checkpoint(path)
    cfg = config_from_dict(cfg_dict, str(path / "config.yaml"), list(overrides))
    if random_init:
        return random_encoder(cfg, seed), cfg
    model = PanFMSSL(cfg)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches: the weights were saved under another config
        raise CheckpointError(f"{path}: weights do not fit the checkpoint's own config: {exc}") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: weights do not fit the checkpoint's own config; "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    encoder = model.encoder_for_eval()
    encoder.requires_grad_(False)
    return encoder.eval(), cfg


def random_encoder(cfg: ExperimentConfig, seed: int) -> PanOrganEncoder:
    """A randomly initialised encoder of ``cfg``'s architecture (the random-init baseline).

    Args:
        cfg: the config fixing the architecture and organ grids.
        seed: initialisation seed (the global torch RNG is reseeded, as model building uses it).
    """
    torch.manual_seed(seed)
    encoder = PanOrganEncoder(cfg)
    encoder.requires_grad_(False)
    return encoder.eval()


def collate_dataset(dataset: SiteDataset | ConcatDataset, cfg: ExperimentConfig,
                    batch_size: int | None = None) -> list[SubjectBatch]:
    """Read every subject of ``dataset`` once and collate them into batches, in dataset order.

    Args:
        dataset: a ``SiteDataset`` or a ``ConcatDataset`` of them (``pooled_dataset``).
        cfg: the experiment config (organ vocabulary; ``evaluation.batch_size`` by default).
        batch_size: subjects per batch; None = ``cfg.evaluation.batch_size``.
    """
    size = batch_size or cfg.evaluation.batch_size
    organs = cfg.data.organ_set()
    labels = tuple(dataset_label_names(dataset))
    n = len(dataset)
    if n == 0:
        raise ValueError("collate_dataset: the dataset holds no subject")
    return [
        collate_subjects([dataset[i] for i in range(start, min(start + size, n))], organs, labels)
        for start in range(0, n, size)
    ]


@torch.no_grad()
def embed_batches(
    encoder: PanOrganEncoder,
    batches: Sequence[SubjectBatch],
    transform: BatchTransform | None = None,
    device: torch.device | str = "cpu",
) -> Embeddings:
    """Encode ``batches`` (optionally transformed) with the frozen encoder.

    Args:
        encoder: the encoder; put in eval mode for the pass (no router noise) and restored after.
        batches: collated subjects (:func:`collate_dataset`), all with the same labels and organs.
        transform: ``(batch index, batch) -> batch`` applied first, e.g. organs removed; batches
            it leaves empty are skipped.
        device: where the encoder runs; the encoder must already be there.
    """
    if not batches:
        raise ValueError("embed_batches: no batches")
    first = batches[0]
    was_training = encoder.training
    encoder.eval()
    ids: list[str] = []
    cls, shares, present, labels, organ_mean = [], [], [], [], []
    try:
        for i, batch in enumerate(batches):
            if batch.label_names != first.label_names or batch.organ_names != first.organ_names:
                raise ValueError(f"embed_batches: batch {i} has different label or organ names than batch 0")
            b = transform(i, batch) if transform is not None else batch
            if b.size == 0:
                continue
            out = encoder(b.to(device))
            ids.extend(b.subject_ids)
            cls.append(out.cls.float().cpu())
            organ_mean.append(organ_token_means(out.tokens, out.organ_id, out.pad, len(b.organ_names)).cpu())
            shares.append(organ_attention_shares(out.cls_attn, out.organ_id, len(b.organ_names)).cpu())
            present.append(b.present.cpu())
            labels.append(b.labels.cpu())
    finally:
        encoder.train(was_training)
    n_organs, n_labels = len(first.organ_names), len(first.label_names)
    return Embeddings(
        subject_ids=ids,
        cls=torch.cat(cls) if cls else torch.zeros(0, 0),
        shares=torch.cat(shares) if shares else torch.zeros(0, n_organs),
        present=torch.cat(present) if present else torch.zeros(0, n_organs, dtype=torch.bool),
        labels=torch.cat(labels) if labels else torch.zeros(0, n_labels),
        label_names=first.label_names,
        organ_names=first.organ_names,
        organ_mean=torch.cat(organ_mean) if organ_mean else torch.zeros(0, n_organs, 0),
    )


__all__ = [
    "BatchTransform",
    "Embeddings",
    "collate_dataset",
    "embed_batches",
    "encoder_from_checkpoint",
    "organ_token_means",
    "random_encoder",
]

"""Collate subjects with different organ sets into one :class:`SubjectBatch` (batch contract)."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from fedpanfm.config import ExperimentConfig
from fedpanfm.data.batch import Subject, SubjectBatch
from fedpanfm.organs import OrganSet


def collate_subjects(
    subjects: list[Subject], organs: OrganSet, label_names: Sequence[str] = ()
) -> SubjectBatch:
    """Stack each organ over only the subjects that have it; no fake organs are made.

    Args:
        subjects: the batch's subjects, in batch order.
        organs: the organ vocabulary; fixes ``present``'s columns and the order of ``images``.
        label_names: the label columns of ``labels``; a label a subject does not carry is NaN
            (unknown), and labels not named here are dropped.
    """
    if not subjects:
        raise ValueError("collate_subjects: empty batch")
    for s in subjects:
        unknown = [o for o in s.images if o not in organs]
        if unknown:
            raise ValueError(
                f"subject {s.subject_id!r} (site {s.site!r}): unknown organ(s) {unknown}; known: {', '.join(organs)}"
            )
    present = torch.zeros(len(subjects), len(organs), dtype=torch.bool)
    images: dict[str, torch.Tensor] = {}
    index: dict[str, torch.Tensor] = {}
    for k, organ in enumerate(organs):
        rows = [b for b, s in enumerate(subjects) if organ in s.images]
        if not rows:
            continue
        shapes = {tuple(subjects[b].images[organ].shape) for b in rows}
        if len(shapes) > 1:
            raise ValueError(f"organ {organ!r}: images of different shapes {sorted(shapes)} in one batch")
        images[organ] = torch.stack([subjects[b].images[organ] for b in rows])
        index[organ] = torch.tensor(rows, dtype=torch.long)
        present[rows, k] = True
    labels = torch.tensor(
        [[float(s.labels.get(name, math.nan)) for name in label_names] for s in subjects], dtype=torch.float32
    ).reshape(len(subjects), len(label_names))
    return SubjectBatch(
        subject_ids=[s.subject_id for s in subjects],
        organ_names=organs.names,
        images=images,
        index=index,
        present=present,
        labels=labels,
        label_names=tuple(label_names),
        sites=[s.site for s in subjects],
    )


def dataset_label_names(dataset: Dataset) -> list[str]:
    """Label names of a ``SiteDataset`` or a ``ConcatDataset`` of them (union, first-seen order)."""
    parts = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
    names: dict[str, None] = {}
    for d in parts:
        if not hasattr(d, "label_names"):
            raise TypeError(f"{type(d).__name__} has no label_names; pass a SiteDataset or a ConcatDataset of them")
        names.update(dict.fromkeys(d.label_names))
    return list(names)


def make_loader(dataset: Dataset, cfg: ExperimentConfig, shuffle: bool, seed: int = 0) -> DataLoader:
    """A DataLoader yielding :class:`SubjectBatch` es (``cfg.data.batch_size``, ``num_workers``).

    Args:
        dataset: a ``SiteDataset`` or a ``ConcatDataset`` of them.
        cfg: the experiment config.
        shuffle: reshuffle subjects every epoch.
        seed: seeds the shuffling, so a run's batch order is reproducible.
    """
    collate = functools.partial(
        collate_subjects, organs=cfg.data.organ_set(), label_names=tuple(dataset_label_names(dataset))
    )
    return DataLoader(
        dataset,
        batch_size=cfg.data.batch_size,
        shuffle=shuffle,
        num_workers=cfg.data.num_workers,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=cfg.data.num_workers > 0,
    )

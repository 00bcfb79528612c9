"""The batch contract between the cohort loaders and the model.

Subjects in one batch hold different organ sets. A batch never carries zero-filled fake organs:
each organ's images are stacked only for the subjects that have that organ, with ``index``
telling which batch row each image belongs to. The model turns this into per-subject token
sequences padded to the longest one, with a key-padding mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Subject:
    """One subject as a dataset yields it.

    Args:
        subject_id: the id from the site manifest.
        images: organ name -> preprocessed float32 tensor of shape (1, *grid) for that organ.
        labels: label name -> 0.0 / 1.0, or NaN where unknown.
        site: the site folder name the subject came from.
    """

    subject_id: str
    images: dict[str, torch.Tensor]
    labels: dict[str, float] = field(default_factory=dict)
    site: str = ""


@dataclass
class SubjectBatch:
    """A batch of ``B`` subjects with possibly different organ sets.

    Args:
        subject_ids: the ``B`` subject ids, in batch order.
        organ_names: the organ vocabulary order used by ``present`` (an ``OrganSet``'s names).
        images: organ -> tensor (n_o, 1, *grid), only the n_o subjects that have the organ.
        index: organ -> long tensor (n_o,), the batch row of each image in ``images[organ]``.
        present: bool tensor (B, n_organs); ``present[b, k]`` when subject b has organ k.
        labels: float tensor (B, n_labels) with NaN for unknown labels.
        label_names: names of the label columns.
        sites: the site of each subject.
    """

    subject_ids: list[str]
    organ_names: tuple[str, ...]
    images: dict[str, torch.Tensor]
    index: dict[str, torch.Tensor]
    present: torch.Tensor
    labels: torch.Tensor
    label_names: tuple[str, ...]
    sites: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.subject_ids)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "SubjectBatch":
        """A copy on ``device``; images cast to ``dtype`` when given."""
        return SubjectBatch(
            subject_ids=self.subject_ids,
            organ_names=self.organ_names,
            images={o: x.to(device=device, dtype=dtype or x.dtype, non_blocking=True) for o, x in self.images.items()},
            index={o: i.to(device, non_blocking=True) for o, i in self.index.items()},
            present=self.present.to(device),
            labels=self.labels.to(device),
            label_names=self.label_names,
            sites=self.sites,
        )

    def select(self, rows: torch.Tensor | list[int]) -> "SubjectBatch":
        """The sub-batch of the given rows (in that order)."""
        rows_t = torch.as_tensor(rows, dtype=torch.long)
        remap = torch.full((self.size,), -1, dtype=torch.long)
        remap[rows_t] = torch.arange(len(rows_t))
        images, index = {}, {}
        for o, idx in self.index.items():
            new = remap[idx.cpu()]
            keep = new >= 0
            if keep.any():
                images[o] = self.images[o][keep.to(self.images[o].device)]
                index[o] = new[keep].to(idx.device)
        return SubjectBatch(
            subject_ids=[self.subject_ids[i] for i in rows_t.tolist()],
            organ_names=self.organ_names,
            images=images,
            index=index,
            present=self.present[rows_t.to(self.present.device)],
            labels=self.labels[rows_t.to(self.labels.device)],
            label_names=self.label_names,
            sites=[self.sites[i] for i in rows_t.tolist()] if self.sites else [],
        )

    def drop_organs(self, organs: list[str]) -> "SubjectBatch":
        """The same subjects with ``organs`` removed (missing-organ evaluation).

        Subjects left with no organ at all are removed from the batch.
        """
        drop = torch.zeros_like(self.present, dtype=torch.bool)
        for o in organs:
            if o in self.organ_names:
                drop[:, self.organ_names.index(o)] = True
        return self.drop_per_subject(drop)

    def drop_per_subject(self, drop: torch.Tensor) -> "SubjectBatch":
        """The batch with a different set of organs removed from each subject.

        Random missing-organ draws and organ-subset views need a per-subject choice;
        :meth:`drop_organs` is the case of the same organs for every subject. Subjects left with
        no organ are removed.

        Args:
            drop: (B, O) bool, True = remove that organ from that subject.
        """
        if drop.shape != self.present.shape:
            raise ValueError(f"drop_per_subject: drop {tuple(drop.shape)} must match present {tuple(self.present.shape)}")
        drop = drop.to(self.present.device)
        images, index = {}, {}
        for organ, rows in self.index.items():
            keep = ~drop[rows, self.organ_names.index(organ)]
            if keep.all():
                images[organ], index[organ] = self.images[organ], rows
            elif keep.any():
                images[organ] = self.images[organ][keep.to(self.images[organ].device)]
                index[organ] = rows[keep]
        present = self.present & ~drop
        pruned = SubjectBatch(
            subject_ids=self.subject_ids, organ_names=self.organ_names, images=images, index=index,
            present=present, labels=self.labels, label_names=self.label_names, sites=self.sites,
        )
        nonempty = torch.nonzero(present.any(dim=1)).flatten().tolist()
        return pruned if len(nonempty) == self.size else pruned.select(nonempty)

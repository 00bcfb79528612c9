"""Self-distillation views of a batch: two augmented global views and organ-subset local views.

DINO's multi-crop gives the student two large (global) crops and several small (local) crops of
each image; the teacher sees the global crops only. Our subjects are sets of organ images, so
(our design, docs/method.md "Views and augmentations"):

- a GLOBAL view holds every organ the subject has, each image independently augmented;
- a LOCAL view holds a random subset of the subject's present organs (a share drawn in
  ``train.local_keep_ratio``, at least one organ), independently augmented: the student must
  match, from part of the body, what the teacher says about the whole. With
  ``train.local_crop`` < 1 each kept organ is also a CROP: a window of whole patches per axis
  (``crop_size``) at a random pixel offset, exact pixels (no resampling), which the tokenizer
  embeds at its own smaller patch grid (as DINO's local crops are smaller images). Two crops of
  an organ share its disease statistics but not its pixels, so matching them cannot rest on
  instance detail (docs/method.md, "Organ crops in the local views").

All views of one kind are stacked into ONE :class:`SubjectBatch`, view-major (row ``v * B + b``
is subject ``b`` in view ``v``), so the encoder runs once per kind of view, not once per view.

Random draws: from the caller's generator; with none, inside a training micro-step
(:func:`fedpanfm.global_batch.global_batch`), each draw is keyed by the row's place in the
site's global batch (a data-parallel rank draws for its subjects what one device would);
otherwise from torch's global RNG.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from fedpanfm.augment import OrganAugmenter
from fedpanfm.data.batch import SubjectBatch
from fedpanfm.global_batch import draws_for


@dataclass
class Views:
    """The views of one batch of ``B`` subjects.

    Args:
        global_views: ``n_global * B`` rows, view-major; every row holds all organs of its subject.
        local_views: ``n_local * B`` rows, view-major, or None without local views.
        n_global: number of global views.
        n_local: number of local views.
        size: ``B``, subjects of the source batch.
    """

    global_views: SubjectBatch
    local_views: SubjectBatch | None
    n_global: int
    n_local: int
    size: int

    @property
    def n_views(self) -> int:
        return self.n_global + self.n_local


def stack_views(batch: SubjectBatch, n: int) -> SubjectBatch:
    """``n`` copies of ``batch`` in one batch, view-major (row ``v * B + b`` = subject b, copy v)."""
    if n < 1:
        raise ValueError(f"stack_views: n = {n} views must be >= 1")
    B = batch.size
    return SubjectBatch(
        subject_ids=batch.subject_ids * n,
        organ_names=batch.organ_names,
        images={o: torch.cat([x] * n) for o, x in batch.images.items()},
        index={o: torch.cat([rows + v * B for v in range(n)]) for o, rows in batch.index.items()},
        present=batch.present.repeat(n, 1),
        labels=batch.labels.repeat(n, 1),
        label_names=batch.label_names,
        sites=batch.sites * n,
    )


def augment_batch(batch: SubjectBatch, augmenter: OrganAugmenter, generator: torch.Generator | None = None,
                  purpose: str = "views") -> SubjectBatch:
    """``batch`` with every image independently augmented: one batched call per organ stack.

    ``purpose`` names the keyed draws (generator None, in a training micro-step): stacks of
    different kinds of view must use different names.
    """
    return replace(batch, images={
        o: augmenter(o, x, draws_for(f"{purpose}/augment/{o}", batch.index[o], batch.size, generator))
        for o, x in batch.images.items()
    })


def crop_size(grid: tuple[int, ...], patch: tuple[int, ...], share: float) -> tuple[int, ...]:
    """A local crop's size per axis: ``share`` of the grid rounded to whole patches, 1 to all of them.

    Args:
        grid: the organ's grid.
        patch: its patch size (divides ``grid``).
        share: the crop's side as a share of each axis (``train.local_crop``); 1 = the whole grid.
    """
    if not 0.0 < share <= 1.0:
        raise ValueError(f"crop_size: share {share} must be in (0, 1]")
    return tuple(min(g // p, max(1, round(share * g / p))) * p for g, p in zip(grid, patch))


def crop_stack(images: Tensor, size: tuple[int, ...], generator: torch.Generator | None, purpose: str,
               rows: Tensor, n_rows: int) -> Tensor:
    """One window of ``size`` per image of ``images`` (n, 1, *grid), at its own uniform pixel offset.

    Exact pixels (one gather, no loop over images). The draws are keyed like the augmentations'
    (``purpose``, the images' batch ``rows`` of ``n_rows``).
    """
    grid = tuple(images.shape[2:])
    if len(size) != len(grid) or any(c > g for c, g in zip(size, grid)):
        raise ValueError(f"crop_stack: crop {size} does not fit the images' grid {grid}")
    if size == grid or images.shape[0] == 0:
        return images
    n, dev = images.shape[0], images.device
    u = draws_for(purpose, rows, n_rows, generator).rand(len(grid), dtype=torch.float64)
    span = torch.tensor([g - c + 1 for g, c in zip(grid, size)], dtype=torch.float64)
    start = (u * span).floor().long().clamp(max=span.long() - 1).to(dev)  # (n, ndim)
    index: list[Tensor] = [torch.arange(n, device=dev).view(n, *([1] * len(grid))), torch.zeros((), dtype=torch.long, device=dev)]
    for a, c in enumerate(size):
        shape = [n] + [1] * len(grid)
        shape[1 + a] = c
        index.append((start[:, a, None] + torch.arange(c, device=dev)[None]).view(shape))
    return images[tuple(index)].unsqueeze(1)


def crop_batch(batch: SubjectBatch, sizes: dict[str, tuple[int, ...]], generator: torch.Generator | None = None,
               purpose: str = "views/local") -> SubjectBatch:
    """``batch`` with each organ's images cropped to ``sizes[organ]`` (organs not named: unchanged)."""
    images = {o: crop_stack(x, sizes[o], generator, f"{purpose}/crop/{o}", batch.index[o], batch.size) if o in sizes else x
              for o, x in batch.images.items()}
    return replace(batch, images=images)


def organ_subsets(present: Tensor, keep_ratio: tuple[float, float], generator: torch.Generator | None = None) -> Tensor:
    """(B, O) bool: per subject, a uniformly random subset of its present organs.

    Its size is ``round(r * |P_b|)`` with ``r ~ U(keep_ratio)`` per subject, clamped to
    [1, |P_b|]: a subject with organs never loses all of them.

    Args:
        present: (B, O) bool organ presence.
        keep_ratio: (low, high) share of the present organs kept.
        generator: CPU generator (None: keyed draws in a training micro-step, else the global RNG).
    """
    lo, hi = keep_ratio
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"organ_subsets: keep_ratio {keep_ratio} must satisfy 0 <= low <= high <= 1")
    present_cpu = present.bool().cpu()
    n_present = present_cpu.sum(dim=1)
    n, n_organs = present_cpu.shape
    draws = draws_for("views/local/subsets", torch.arange(n), n, generator)
    u, score = draws.rand(), draws.rand(n_organs)
    r = lo + (hi - lo) * u
    k = torch.minimum(torch.clamp((r * n_present).round().long(), min=1), n_present)
    score = torch.where(present_cpu, score, torch.full_like(score, 2.0))  # absent organs rank last
    rank = score.argsort(dim=1).argsort(dim=1)
    return ((rank < k[:, None]) & present_cpu).to(present.device)


def make_views(
    batch: SubjectBatch,
    n_global: int,
    n_local: int,
    keep_ratio: tuple[float, float],
    augmenter: OrganAugmenter | None,
    generator: torch.Generator | None = None,
    crop_sizes: dict[str, tuple[int, ...]] | None = None,
) -> Views:
    """The global and local views of ``batch``.

    Args:
        batch: the subjects (any device; images are augmented where they are).
        n_global: global views (2 in DINO).
        n_local: organ-subset views (0 = none).
        keep_ratio: (low, high) share of a subject's organs each local view keeps.
        augmenter: per-organ augmentation (None: views differ only in their organ subsets).
        generator: CPU generator for the subsets, crops and augmentations (None: keyed draws in
            a training micro-step, else the global RNG).
        crop_sizes: organ -> the size of its local crops (:func:`crop_size`); None or an organ
            not named: local views hold the whole image.
    """
    if not bool(batch.present.any(dim=1).all()):
        raise ValueError("make_views: a subject of the batch has no organ (nothing to view)")
    global_views = stack_views(batch, n_global)
    local_views = None
    if n_local > 0:
        stacked = stack_views(batch, n_local)
        keep = organ_subsets(stacked.present, keep_ratio, generator)
        # Subsets first, augmentation after: only the kept images are transformed.
        local_views = stacked.drop_per_subject(stacked.present & ~keep)
        if crop_sizes:
            local_views = crop_batch(local_views, crop_sizes, generator)
    if augmenter is not None:
        global_views = augment_batch(global_views, augmenter, generator, "views/global")
        if local_views is not None:
            local_views = augment_batch(local_views, augmenter, generator, "views/local")
    return Views(global_views, local_views, n_global, n_local, batch.size)


__all__ = ["Views", "augment_batch", "crop_batch", "crop_size", "crop_stack", "make_views", "organ_subsets", "stack_views"]

"""Organ contrast: each organ image of a local view must find the same subject's same organ.

Our design (docs/method.md, "Organ contrast"); no reference paper has it. DINO's CLS loss and
iBOT's patch loss never ask a token to tell one subject's liver from another's: the CLS settles on
body size and organ presence, and a patch token's target is its own patch. Measured on the study's
cohort (docs/results.md, "Ninth session"), this InfoNCE term over organ embeddings is the first
change that moves the organ-mean readout clearly above the random encoder (+0.04 macro AUROC).

The form is SimCLR's / MoCo's InfoNCE (REFERENCES.md) over organ embeddings: a query is the
projected mean token of one organ in one local view of a subject; its key is the projected mean
token of the same organ in the student's global views of that subject (averaged over the views
where the organ kept a visible token); every other key of the global batch (other subjects'
organs, the subject's other organs) is a negative. Keys carry gradient (measured: detached keys
keep a quarter of the gain), so several data-parallel ranks gather them with gradient
(:func:`fedpanfm.global_batch.all_gather_rows`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fedpanfm.global_batch import all_gather_rows, mean_denominator


def organ_contrast_loss(queries: Tensor, keys: Tensor, positive: Tensor, temperature: float) -> Tensor:
    """Mean over the global batch's queries of the InfoNCE loss against all its keys.

    Args:
        queries: (Q, P) this process's query embeddings (normalised here).
        keys: (K, P) this process's key embeddings (normalised here); the keys of every rank
            sharing the global batch are gathered, with gradient.
        positive: (Q,) long, the index in ``keys`` of each query's positive key.
        temperature: the softmax temperature of the cosine similarities (> 0).

    Returns:
        A scalar: this process's sum of query losses over its share of the global batch's query
        count (:func:`fedpanfm.global_batch.mean_denominator`), i.e. the plain mean when alone.
    """
    if queries.dim() != 2 or keys.dim() != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"organ_contrast_loss: queries {tuple(queries.shape)} and keys {tuple(keys.shape)} "
                         "must be (Q, P) and (K, P)")
    if positive.shape != (queries.shape[0],):
        raise ValueError(f"organ_contrast_loss: positive {tuple(positive.shape)} must be ({queries.shape[0]},)")
    if temperature <= 0:
        raise ValueError(f"organ_contrast_loss: temperature must be > 0, got {temperature}")
    if positive.numel() and not (0 <= int(positive.min()) and int(positive.max()) < keys.shape[0]):
        raise ValueError(f"organ_contrast_loss: positive indices outside [0, {keys.shape[0]})")
    all_keys, offset = all_gather_rows(F.normalize(keys.float(), dim=-1))
    logits = F.normalize(queries.float(), dim=-1) @ all_keys.T / temperature
    summed = F.cross_entropy(logits, positive + offset, reduction="sum") if positive.numel() else logits.sum()
    count = torch.tensor(float(positive.numel()), device=queries.device)
    # Every rank reaches the gather's backward even without queries: the key term adds 0.
    return summed / mean_denominator(count).clamp(min=1.0) + 0.0 * all_keys.sum()


__all__ = ["organ_contrast_loss"]

"""Attention balance: how the CLS attention is spread over organs, next to what each organ is worth.

Definitions (ours, docs/evaluation.md), from the last block's CLS attention averaged over heads,
per subject b and organ o: a_{b,o} = share of the attention on o's tokens over the organs present
(``fedpanfm.sgm.organ_attention_shares``; rows sum to 1).

- ``attn_share``: mean of a_{b,o} over subjects that have o;
- ``pooled_share``: sum_b a_{b,o} / N over all N subjects (sums to 1 over organs);
- ``relative``: mean over subjects with o of |P_b| a_{b,o} (1 = what an organ would get if the
  attention were spread evenly over the subject's organs; the unit SGM's saliency uses);
- entropy: per subject, H_b = -sum_o a_{b,o} log a_{b,o} / log |P_b| over its |P_b| >= 2 present
  organs (1 = even spread), averaged over those subjects; ``pooled_entropy`` is the entropy of
  the pooled shares over organs seen at all, normalised the same way;
- ``info_drop``: macro probe AUROC lost when o is removed and the probes are refitted without it
  (paired, same test subjects; ``fedpanfm.evaluation.information``), and ``info_share`` =
  max(info_drop, 0) normalised to sum 1 over organs (NaN when no organ's removal costs anything);
- ``inference_drop`` / ``inference_share``: the same from the full-organ probes scored with o
  removed at inference (``ConditionResult.drop`` of ``drop:<o>``): robustness, which mixes the
  organ's information with the embedding shift its absence causes.
A shortcut shows as organs whose attention share far exceeds their information share.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from fedpanfm.evaluation.embed import Embeddings


@dataclass
class OrganBalance:
    """One organ's row of the attention-balance table (see the module docstring)."""

    organ: str
    n_subjects: int
    attn_share: float
    pooled_share: float
    relative: float
    info_drop: float
    info_share: float
    inference_drop: float = math.nan
    inference_share: float = math.nan


@dataclass
class AttentionBalance:
    """Per-organ rows plus the entropy summaries."""

    organs: list[OrganBalance]
    entropy: float
    pooled_entropy: float
    n_entropy_subjects: int


def normalised_entropy(shares: Tensor, present: Tensor) -> Tensor:
    """(N,) entropy of each row of ``shares`` over its present organs, divided by log |P_b|.

    Args:
        shares: (N, O) non-negative, rows summing to 1 over present organs.
        present: (N, O) bool.

    Rows with fewer than 2 present organs give NaN (the normalised entropy is undefined).
    """
    p = torch.where(present, shares.double(), torch.zeros((), dtype=torch.float64))
    plogp = torch.where(p > 0, p * torch.log(p.clamp(min=1e-300)), torch.zeros_like(p))
    n = present.sum(dim=1).double()
    h = -plogp.sum(dim=1)
    return torch.where(n >= 2, h / torch.log(n.clamp(min=2)), torch.full_like(h, math.nan))


def drop_shares(drops: Mapping[str, float]) -> dict[str, float]:
    """organ -> max(drop, 0) / sum over organs of max(drop, 0); NaN for a NaN drop or a zero sum.

    Args:
        drops: organ -> macro AUROC lost without the organ (NaN if unknown).
    """
    positive = {o: max(d, 0.0) if not math.isnan(d) else 0.0 for o, d in drops.items()}
    total = sum(positive.values())
    return {o: positive[o] / total if total > 0 and not math.isnan(d) else math.nan for o, d in drops.items()}


def attention_balance(
    emb: Embeddings, info_drop: Mapping[str, float], inference_drop: Mapping[str, float] | None = None
) -> AttentionBalance:
    """The attention-balance table of a full-organ embedding pass.

    Args:
        emb: full-organ embeddings (``shares`` and ``present`` are used).
        info_drop: organ -> macro AUROC drop with the probes refitted without the organ (NaN if unknown).
        inference_drop: organ -> macro AUROC drop of the full-organ probes with the organ removed
            at inference; None leaves those columns NaN.
    """
    if len(emb) == 0:
        raise ValueError("attention_balance: no subjects")
    shares, present = emb.shares.double(), emb.present
    n_with = present.sum(dim=0)
    masked = torch.where(present, shares, torch.zeros((), dtype=torch.float64))
    attn_share = masked.sum(0) / n_with.clamp(min=1)
    pooled = masked.sum(0) / len(emb)
    relative = (masked * present.sum(dim=1, keepdim=True)).sum(0) / n_with.clamp(min=1)
    drops = {o: float(info_drop.get(o, math.nan)) for o in emb.organ_names}
    inf_drops = {o: float((inference_drop or {}).get(o, math.nan)) for o in emb.organ_names}
    info_share, inf_share = drop_shares(drops), drop_shares(inf_drops)
    rows = []
    for k, organ in enumerate(emb.organ_names):
        seen = int(n_with[k]) > 0
        rows.append(OrganBalance(
            organ=organ,
            n_subjects=int(n_with[k]),
            attn_share=float(attn_share[k]) if seen else math.nan,
            pooled_share=float(pooled[k]),
            relative=float(relative[k]) if seen else math.nan,
            info_drop=drops[organ],
            info_share=info_share[organ],
            inference_drop=inf_drops[organ],
            inference_share=inf_share[organ],
        ))
    h = normalised_entropy(shares, present)
    valid = ~torch.isnan(h)
    seen_organs = (n_with > 0).unsqueeze(0)
    pooled_h = normalised_entropy(pooled.unsqueeze(0), seen_organs)[0]
    return AttentionBalance(
        organs=rows,
        entropy=float(h[valid].mean()) if valid.any() else math.nan,
        pooled_entropy=float(pooled_h),
        n_entropy_subjects=int(valid.sum()),
    )


__all__ = ["AttentionBalance", "OrganBalance", "attention_balance", "drop_shares", "normalised_entropy"]

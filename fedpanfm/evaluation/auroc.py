"""AUROC as the Mann-Whitney statistic with average ranks for ties, and its bootstrap CI.

One implementation serves both the point estimate and the bootstrap: a bootstrap resample is a
vector of subject multiplicities (weights), so the scores are sorted and grouped into tie groups
once and every resample is a weighted sum over those groups, vectorised over resamples.

With weights w, positives P and negatives N, the statistic is

    AUROC = sum_{i in P, j in N} w_i w_j ([s_i > s_j] + 0.5 [s_i = s_j]) / (W_P W_N),

which for unit weights equals the rank-sum form (R_P - n_P (n_P + 1) / 2) / (n_P n_N), R_P being
the sum of the positives' average ranks (:func:`average_ranks`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _tie_groups(scores: Tensor) -> tuple[Tensor, Tensor, int]:
    """(order, group id of each sorted position, number of groups) of 1-D ``scores``."""
    if scores.dim() != 1:
        raise ValueError(f"AUROC: scores must be 1-D, got shape {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError("AUROC: scores hold NaN or infinite values")
    sorted_s, order = torch.sort(scores)
    new_group = torch.ones_like(sorted_s, dtype=torch.long)
    new_group[1:] = (sorted_s[1:] != sorted_s[:-1]).long()
    group = torch.cumsum(new_group, 0) - 1
    n_groups = int(group[-1]) + 1 if len(group) else 0
    return order, group, n_groups


def average_ranks(scores: Tensor) -> Tensor:
    """1-based ranks of ``scores`` (n,), tied values sharing the mean of the ranks they span."""
    order, group, n_groups = _tie_groups(scores)
    size = torch.zeros(n_groups, dtype=torch.float64).scatter_add_(0, group, torch.ones(len(group), dtype=torch.float64))
    below = torch.cumsum(size, 0) - size
    ranks_sorted = (below + (size + 1) / 2)[group]
    return torch.empty_like(ranks_sorted).scatter_(0, order, ranks_sorted)


def auroc(scores: Tensor, labels: Tensor, weights: Tensor | None = None) -> Tensor:
    """AUROC of ``scores`` for binary ``labels``, optionally for many weightings at once.

    Args:
        scores: (n,) finite scores, higher = more likely positive.
        labels: (n,) 0 / 1 (float or bool); no unknowns (drop them first).
        weights: optional (R, n) non-negative multiplicities, e.g. bootstrap counts
            (:func:`bootstrap_counts`); None = each subject once.

    Returns:
        A 0-d float64 tensor (no ``weights``) or (R,) float64; NaN where a weighting leaves no
        positive or no negative (AUROC undefined).
    """
    labels = torch.as_tensor(labels)
    if labels.shape != scores.shape:
        raise ValueError(f"AUROC: labels {tuple(labels.shape)} and scores {tuple(scores.shape)} differ in shape")
    y = labels.double()
    if not ((y == 0) | (y == 1)).all():
        raise ValueError("AUROC: labels must be 0 or 1 (drop unknown labels before scoring)")
    single = weights is None
    w = torch.ones(1, len(y), dtype=torch.float64) if single else torch.as_tensor(weights).double()
    if w.dim() != 2 or w.shape[1] != len(y):
        raise ValueError(f"AUROC: weights {tuple(w.shape)} must be (R, {len(y)})")
    order, group, n_groups = _tie_groups(scores.double())
    w_sorted, y_sorted = w[:, order], y[order]
    pos = torch.zeros(w.shape[0], n_groups, dtype=torch.float64).index_add_(1, group, w_sorted * y_sorted)
    neg = torch.zeros(w.shape[0], n_groups, dtype=torch.float64).index_add_(1, group, w_sorted * (1 - y_sorted))
    neg_below = torch.cumsum(neg, 1) - neg
    u = (pos * (neg_below + 0.5 * neg)).sum(1)
    denom = pos.sum(1) * neg.sum(1)
    out = torch.where(denom > 0, u / denom.clamp(min=1e-300), torch.full_like(u, math.nan))
    return out[0] if single else out


def bootstrap_counts(n: int, n_boot: int, generator: torch.Generator) -> Tensor:
    """(n_boot, n) multiplicities of n items under resampling with replacement.

    Args:
        n: number of items (test subjects).
        n_boot: number of resamples.
        generator: seeded CPU generator (reproducible CIs).
    """
    if n < 1 or n_boot < 1:
        raise ValueError(f"bootstrap_counts: need n >= 1 and n_boot >= 1, got n={n}, n_boot={n_boot}")
    idx = torch.randint(0, n, (n_boot, n), generator=generator)
    return torch.zeros(n_boot, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones(n_boot, n, dtype=torch.float64))


def percentile_ci(values: Tensor, level: float) -> tuple[float, float]:
    """Percentile interval of bootstrap ``values`` (R,), ignoring NaN resamples.

    Args:
        values: bootstrap replicates of a statistic.
        level: coverage, e.g. 0.95 for the 2.5 and 97.5 percentiles.

    Returns (nan, nan) when no replicate is finite.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"percentile_ci: level {level} must be in (0, 1)")
    v = values[torch.isfinite(values)].double()
    if v.numel() == 0:
        return math.nan, math.nan
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(v, q).tolist()
    return lo, hi


__all__ = ["auroc", "average_ranks", "bootstrap_counts", "percentile_ci"]

"""Robust aggregation of the shared backbone: coordinate-wise median and trimmed mean.

Both are unweighted across sites (our choice: a robust statistic weighted by the sites' own
claimed subject counts would let one hostile site buy weight by lying about its size). They
apply to the "shared" parameter groups only; organ tokenizers and experts keep their
organ- / gate-mass-weighted means (those weights are what makes them correct under missing
organs, and few sites train each of them, so a median over 1-2 values would mean nothing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def _stack(tensors: Sequence[Tensor], what: str) -> Tensor:
    if not tensors:
        raise ValueError(f"{what}: no tensors")
    shape = tensors[0].shape
    for i, t in enumerate(tensors):
        if t.shape != shape:
            raise ValueError(f"{what}: tensor {i} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return torch.stack([t.to(torch.float64) for t in tensors])


def coordinate_median(tensors: Sequence[Tensor]) -> Tensor:
    """Element-wise median over the sites (mean of the two middle values for an even count,
    as numpy's median), in ``tensors[0]``'s dtype.

    Args:
        tensors: one tensor per site, all the same shape.
    """
    x = _stack(tensors, "coordinate_median").sort(dim=0).values
    n = x.shape[0]
    mid = x[n // 2] if n % 2 else 0.5 * (x[n // 2 - 1] + x[n // 2])
    return mid.to(tensors[0].dtype)


def trimmed_mean(tensors: Sequence[Tensor], fraction: float) -> Tensor:
    """Element-wise mean after dropping the ``floor(fraction * n)`` smallest and largest values
    (scipy.stats.trim_mean's rule), in ``tensors[0]``'s dtype.

    Args:
        tensors: one tensor per site, all the same shape.
        fraction: share cut at each end, in [0, 0.5).
    """
    if not 0.0 <= fraction < 0.5:
        raise ValueError(f"trimmed_mean: fraction = {fraction} must be in [0, 0.5)")
    x = _stack(tensors, "trimmed_mean").sort(dim=0).values
    k = int(math.floor(fraction * x.shape[0]))
    return x[k: x.shape[0] - k].mean(dim=0).to(tensors[0].dtype)


def robust_reduce(tensors: Sequence[Tensor], method: str, fraction: float = 0.0) -> Tensor:
    """Dispatch on ``federation.robust`` ("median" or "trimmed_mean").

    Args:
        tensors: one tensor per site.
        method: "median" or "trimmed_mean".
        fraction: the trim share for "trimmed_mean".
    """
    if method == "median":
        return coordinate_median(tensors)
    if method == "trimmed_mean":
        return trimmed_mean(tensors, fraction)
    raise ValueError(f"robust_reduce: unknown method {method!r} (median, trimmed_mean)")


__all__ = ["coordinate_median", "robust_reduce", "trimmed_mean"]

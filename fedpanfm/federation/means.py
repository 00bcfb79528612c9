"""Weighted means of state-dict tensors: the kernel and the per-group task of server aggregation.

Every parameter group of a round is a weighted mean over the sites (``planning.plan_means``
gives each its weights), independent of the others, so the groups can run in parallel
(``orchestration.ray_aggregation``) or one by one (:func:`run_means_serial`). No input tensor is
ever modified; a group with no weight returns the previous tensor objects.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedpanfm.federation.directors import State
from fedpanfm.federation.param_groups import ParamGroup
from fedpanfm.federation.robust import robust_reduce

#: Elements per block of :func:`weighted_mean`: 256 KiB of float32 partial sum (fits L2), and no
#: larger than torch's intra-op grain, so each op runs on one thread: on a busy machine a
#: two-thread op waits for a descheduled thread (measured 3-7x slower under load).
_MEAN_BLOCK = 65536

#: Sites summed in float32 before a float64 combine (see :func:`weighted_mean`).
_FP32_RUN = 16


def _normalised(weights: Sequence[float] | Tensor, sites: int) -> list[float] | None:
    """``weights / sum(weights)`` as floats after checking them; None when all are zero."""
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if sites != w.numel() or not sites:
        raise ValueError(f"weighted_mean: {sites} tensors for {w.numel()} weights")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"weighted_mean: weights must be finite and >= 0, got {w.tolist()}")
    total = float(w.sum())
    return None if total == 0.0 else (w / total).tolist()


def weighted_mean(tensors: Sequence[Tensor], weights: Sequence[float] | Tensor) -> Tensor | None:
    """sum_i w_i * t_i / sum_i w_i, returned in ``tensors[0]``'s dtype.

    Floating tensors are summed in float32 over runs of at most ``_FP32_RUN`` sites (the
    runs' partial sums combined in float64 when there are several); integer and bool tensors
    in float64, rounded back. Our design (docs/performance.md, item 5): the float32 run keeps
    every add a single vectorised same-dtype pass (a mixed float32 -> float64 add ran at half
    the speed), and its rounding error is bounded by the run length, not the federation size:
    |error| <= ~(_FP32_RUN + 1) * 2^-24 * sum_i |w_i t_i| / sum_i w_i per element, whatever the
    number of sites. Flower's FedAvg accumulates every site in float32.

    Args:
        tensors: one tensor per site, all the same shape.
        weights: one non-negative weight per site (normalised here).

    Returns:
        the mean, or None when every weight is zero ("keep the previous value").
    """
    wn = _normalised(weights, len(tensors))
    return None if wn is None else _blocked_mean(tensors, wn)


def _blocked_mean(tensors: Sequence[Tensor], wn: Sequence[float]) -> Tensor:
    """:func:`weighted_mean` with checked weights ``wn`` that sum to 1."""
    shape = tensors[0].shape
    for i, t in enumerate(tensors):
        if t.shape != shape:
            raise ValueError(f"weighted_mean: tensor {i} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    dtype = tensors[0].dtype
    terms = [(t.reshape(-1), wi) for t, wi in zip(tensors, wn) if wi]
    floating = dtype.is_floating_point
    run = _FP32_RUN if floating else 1
    runs = [terms[i : i + run] for i in range(0, len(terms), run)]
    n = shape.numel()
    out = torch.empty(n, dtype=dtype)
    step = min(n, _MEAN_BLOCK)
    # One run straight into ``out`` when it is float32 (no final copy); otherwise a float64
    # accumulator across runs.
    direct = floating and len(runs) == 1 and dtype == torch.float32
    part = out if direct else torch.empty(step, dtype=torch.float32 if floating else torch.float64)
    acc = None if direct else torch.empty(step, dtype=torch.float64)
    # Cache-blocked: a block's partial sum stays in cache while every site's slice is added,
    # so memory traffic is one read per input byte (docs/performance.md: a whole-tensor
    # accumulator ran at a tenth of copy bandwidth on 100M parameters).
    for lo in range(0, n, _MEAN_BLOCK):
        hi = min(n, lo + _MEAN_BLOCK)
        for r, sites in enumerate(runs):
            p = out[lo:hi] if direct else part[: hi - lo]
            (flat0, w0), rest = sites[0], sites[1:]
            if flat0.dtype == p.dtype:
                torch.mul(flat0[lo:hi], w0, out=p)
            else:
                # Widen first: a mixed mul would round w0 * t in the input's (narrower) dtype.
                p.copy_(flat0[lo:hi]).mul_(w0)
            for flat, wi in rest:
                p.add_(flat[lo:hi], alpha=wi)
            if acc is not None:
                a = acc[: hi - lo]
                a.copy_(p) if r == 0 else a.add_(p)
        if acc is not None:
            a = acc[: hi - lo]
            out[lo:hi].copy_(a if floating else a.round())
    return out.reshape(shape)


@dataclass(frozen=True)
class MeanTask:
    """One parameter group to average.

    Args:
        group: the group (for logs and metrics).
        keys: the state-dict keys of the group.
        weights: (n_sites,) float64 per-site weights, in update order.
        reducer: "mean" (weighted), or "median" / "trimmed_mean" (unweighted over the sites
            with a positive weight; ``federation.robust``, shared groups only).
        trim: the share cut at each end for "trimmed_mean".
    """

    group: ParamGroup
    keys: tuple[str, ...]
    weights: Tensor
    reducer: str = "mean"
    trim: float = 0.0


def mean_group(
    keys: Sequence[str], site_states: Sequence[Mapping[str, Tensor]], weights: Tensor, previous: Mapping[str, Tensor],
    reducer: str = "mean", trim: float = 0.0,
) -> State:
    """The weighted mean (or robust reduction) of each key over the sites, or the previous
    tensor if no site has weight.

    Args:
        keys: the group's state-dict keys.
        site_states: one state dict per site (holding at least ``keys``).
        weights: (n_sites,) non-negative weights.
        previous: the global state before the round (the fallback for an all-zero weight).
        reducer: "mean", "median" or "trimmed_mean" (see :class:`MeanTask`).
        trim: the trim share for "trimmed_mean".
    """
    out: State = {}
    try:
        wn = _normalised(weights, len(site_states))  # checked once for the group's keys
    except ValueError as exc:
        raise ValueError(f"key {keys[0] if keys else '?'!r}: {exc}") from None
    if wn is None:
        return {key: previous[key] for key in keys}
    voters = [i for i, wi in enumerate(wn) if wi > 0]
    for key in keys:
        try:
            if reducer != "mean" and voters and site_states[voters[0]][key].is_floating_point():
                out[key] = robust_reduce([site_states[i][key] for i in voters], reducer, trim)
                continue
            # A site may omit an expert it gave zero weight (check_update admits only that):
            # the previous tensor stands in for it and contributes nothing to the mean.
            tensors = [s[key] if key in s or wn[i] > 0 else previous[key] for i, s in enumerate(site_states)]
            out[key] = _blocked_mean(tensors, wn)
        except ValueError as exc:
            raise ValueError(f"key {key!r}: {exc}") from None
    return out


def run_means_serial(tasks: Sequence[MeanTask], site_states: Sequence[Mapping[str, Tensor]], previous: Mapping[str, Tensor]) -> State:
    """Every task's :func:`mean_group`, one after the other (the reference the Ray path matches)."""
    out: State = {}
    for task in tasks:
        out.update(mean_group(task.keys, site_states, task.weights, previous, task.reducer, task.trim))
    return out


RunMeans = Callable[[Sequence[MeanTask], Sequence[Mapping[str, Tensor]], Mapping[str, Tensor]], State]


__all__ = ["MeanTask", "RunMeans", "mean_group", "run_means_serial", "weighted_mean"]

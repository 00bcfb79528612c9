"""How much one site can move a round: its weight and its update size, bounded by the others.

Our design (docs/security.md, "Bounded influence"), the defaults of every non-DP round:

- **Subject cap** (``federation.subject_cap`` = k): a site's subject count weighs at most
  ``k x`` the round's lower median count; its organ-subject counts and gate mass are scaled by
  the same factor, so its weights stay consistent across groups. A site claiming a million
  subjects among sites of 100 then holds at most ``k*100 / (k*100 + sum of the others)`` of
  any mean, instead of almost all of it.
- **Update-norm cap** (``federation.update_norm_cap`` = k): each site's ``update - global``
  (every floating tensor it sent but the accumulators) is clipped to ``k x`` the round's lower
  median norm. A scaled update moves the mean by at most its weight share times that bound.

Lower medians (the smaller middle value for an even count): with two sites neither can lift
the bound above what the smaller one sent. Under DP neither applies: the DP clip bounds every
update, and the fixed-denominator mean gives every site the same weight.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedpanfm.federation.deltas import clip_delta, delta_norm
from fedpanfm.federation.param_groups import classify
from fedpanfm.federation.protocol import SiteUpdate


def lower_median(values: Sequence[float]) -> float:
    """The lower middle value of ``values`` (one value: itself)."""
    if not values:
        raise ValueError("lower_median: no values")
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def norm_keys(update: SiteUpdate) -> list[str]:
    """The keys an update's size is measured over: its floating tensors but the accumulators."""
    return [k for k, t in update.state.items() if t.is_floating_point() and classify(k).kind != "accumulator"]


def cap_subjects(updates: Sequence[SiteUpdate], factor: float) -> tuple[list[SiteUpdate], dict[str, float]]:
    """Updates whose subject counts weigh at most ``factor x`` the lower median.

    Args:
        updates: the round's checked updates.
        factor: k; 0 = no cap.

    Returns:
        (the updates, a capped one as a copy with scaled counts; site -> scale in (0, 1]).
    """
    scales = {u.site: 1.0 for u in updates}
    if factor <= 0 or not updates:
        return list(updates), scales
    cap = max(1, int(factor * lower_median([u.num_examples for u in updates])))
    out = []
    for u in updates:
        if u.num_examples <= cap:
            out.append(u)
            continue
        r = cap / u.num_examples
        scales[u.site] = r
        out.append(dataclasses.replace(u, num_examples=cap, organ_subjects=u.organ_subjects * r,
                                       gate_mass=u.gate_mass * r))
    return out, scales


def cap_update_norms(updates: Sequence[SiteUpdate], global_state: Mapping[str, Tensor],
                     factor: float) -> tuple[list[SiteUpdate], dict[str, float]]:
    """Updates whose ``||update - global||`` is at most ``factor x`` the lower median norm.

    Args:
        updates: the round's checked updates.
        global_state: the global state the round started from.
        factor: k; 0 = no cap.

    Returns:
        (the updates, a clipped one as a copy; site -> the scale applied to its delta).
    """
    scales = {u.site: 1.0 for u in updates}
    if factor <= 0 or not updates:
        return list(updates), scales
    norms = [delta_norm(u.state, global_state, norm_keys(u)) for u in updates]
    bound = factor * lower_median(norms)
    out = []
    for u, norm in zip(updates, norms):
        if norm <= bound:
            out.append(u)
            continue
        keys = norm_keys(u)
        if bound > 0:
            state, _ = clip_delta(u.state, global_state, keys, bound)
        else:  # every other site sent the global weights back: this one may not move them either
            state = {**u.state, **{k: global_state[k].to(u.state[k].dtype) for k in keys}}
        scales[u.site] = bound / norm
        out.append(dataclasses.replace(u, state=state))
    return out, scales


def normalised_saliency(saliency: Tensor, organ_subjects: Tensor) -> Tensor:
    """A site's saliency rescaled to mean 1 over the organs it holds (its own units: shares x
    organs held; docs/federation.md), 0 elsewhere; all zero if it holds none or reports none.

    A site therefore cannot weigh its saliency by its scale: only the ranking and ratios it
    reports count, and the organs it lacks carry nothing.
    """
    held = organ_subjects > 0
    s = torch.where(held, saliency.to(torch.float64), torch.zeros((), dtype=torch.float64))
    total = float(s.sum())
    n = int(held.sum())
    return s * (n / total) if total > 0 else torch.zeros_like(s)


__all__ = ["cap_subjects", "cap_update_norms", "lower_median", "norm_keys", "normalised_saliency"]

"""Federated Saliency-Guided Masking: one federation-wide organ saliency from the sites' own.

Our reconstruction (docs/federation.md, "Federated SGM"): a site only measures saliency for the
organs its subjects have, so each organ's global value is the mean over the sites holding it,
weighted by how many of their subjects have it; an organ nobody holds this round keeps its
previous global value; the result is renormalised to shares summing to 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def aggregate_saliency(
    site_saliency: Sequence[Tensor],
    organ_subjects: Sequence[Tensor],
    previous: Tensor | None = None,
) -> Tensor:
    """Global organ saliency shares (n_organs,) float64.

    Args:
        site_saliency: per site, its saliency (n_organs,) in organ-vocabulary order.
        organ_subjects: per site, its training subjects holding each organ (n_organs,).
        previous: last round's global shares (n_organs,); None means uniform.

    Raises ValueError on mismatched lengths or negative / non-finite inputs.
    """
    if len(site_saliency) != len(organ_subjects):
        raise ValueError(f"aggregate_saliency: {len(site_saliency)} saliency vectors for {len(organ_subjects)} sites")
    if not site_saliency and previous is None:
        raise ValueError("aggregate_saliency: no site and no previous value")
    n = len(previous) if previous is not None else len(site_saliency[0])
    prev = torch.full((n,), 1.0 / n, dtype=torch.float64) if previous is None else previous.to(torch.float64).flatten()
    if not site_saliency:
        return prev.clone()
    sal = torch.stack([s.to(torch.float64).flatten() for s in site_saliency])
    cnt = torch.stack([c.to(torch.float64).flatten() for c in organ_subjects])
    if sal.shape != (len(site_saliency), n) or cnt.shape != sal.shape:
        raise ValueError(f"aggregate_saliency: expected (n_sites, {n}) inputs, got {tuple(sal.shape)} and {tuple(cnt.shape)}")
    for name, x in (("saliency", sal), ("organ_subjects", cnt), ("previous", prev)):
        if not torch.isfinite(x).all() or (x < 0).any():
            raise ValueError(f"aggregate_saliency: {name} must be finite and >= 0")
    held = cnt.sum(0)
    mean = (sal * cnt).sum(0) / held.clamp_min(1e-300)
    out = torch.where(held > 0, mean, prev)
    total = out.sum()
    # All-zero saliency would leave SGM without a ranking: fall back to uniform shares.
    return out / total if total > 0 else torch.full((n,), 1.0 / n, dtype=torch.float64)


__all__ = ["aggregate_saliency"]

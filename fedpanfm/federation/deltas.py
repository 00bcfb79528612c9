"""A site's update as a delta from the global state: its L2 norm, and the update clipped to a norm.

The server bounds a site's influence by these (``influence.cap_update_norms``), privatises with
them (``privacy``: the per-site clip of central DP) and checks them (``validation``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor


def delta_norm(site: Mapping[str, Tensor], global_state: Mapping[str, Tensor], keys: Iterable[str]) -> float:
    """L2 norm of ``site - global`` over ``keys`` (all concatenated), in float64."""
    total = 0.0
    for k in keys:
        total += float((site[k].to(torch.float64) - global_state[k].to(torch.float64)).pow(2).sum())
    return math.sqrt(total)


def clip_delta(site: Mapping[str, Tensor], global_state: Mapping[str, Tensor], keys: Sequence[str],
               clip_norm: float) -> tuple[dict[str, Tensor], float]:
    """``global + (site - global) * min(1, clip_norm / ||site - global||)`` over ``keys``.

    Args:
        site: a site's state dict (not modified).
        global_state: the global state the site started from.
        keys: the keys to clip (under DP: ``privacy.dp_keys``); other keys are passed through.
        clip_norm: the L2 bound C > 0.

    Returns:
        (the clipped state, the norm before clipping).
    """
    if clip_norm <= 0:
        raise ValueError(f"clip_delta: clip_norm = {clip_norm} must be > 0")
    norm = delta_norm(site, global_state, keys)
    if norm <= clip_norm:
        return dict(site), norm
    scale = clip_norm / norm
    out = dict(site)
    for k in keys:
        g = global_state[k].to(torch.float64)
        out[k] = (g + (site[k].to(torch.float64) - g) * scale).to(site[k].dtype)
    return out, norm


__all__ = ["clip_delta", "delta_norm"]

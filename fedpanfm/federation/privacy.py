"""Central differential privacy: the per-site clip, the fixed-denominator mean, the noise.

Our reconstruction (no paper fixes it; docs/security.md, "Differential privacy"):

- **What is privatised**: every floating tensor the server averages (:func:`dp_keys`: student
  weights but the directors and accumulators, the DINO / iBOT centres, the masker buffers) and
  the site's organ saliency, as ONE joint vector per site. Everything else the server sends is
  derived from the noised result only: the teacher (server EMA of the noised student), the
  directors (group EMA of the noised experts with uniform expert weights and the planned step
  count, never the sites' gate mass or steps), the reset accumulators.
- **Clip per site**: the joint delta ``site - global`` is scaled to L2 norm <= ``clip_norm``
  (:func:`clip_delta`). Clipping happens at the server (central DP: the server is trusted).
- **Fixed denominator** (McMahan et al. 2018, "DP-FedAvg"; Flower's DP wrappers divide by the
  number of sampled sites the same way): ``new = global + sum_i w_i * clipped_delta_i / D`` with
  ``w_i`` = 1 for a site that trained the group (0 otherwise) and ``D`` = the sites SAMPLED this
  round, fixed before any reply. Adding or removing one site moves the result by at most
  ``clip_norm / D`` in L2, whatever the others sent (a data-dependent denominator, as the
  weighted mean has, moves by up to twice that and more).
- **Noise**: N(0, (noise_multiplier * clip_norm / D)^2) on every privatised element, drawn from
  a generator seeded from the operating system's CSPRNG (``secrets``) for every release: it is
  never derivable from the config, the checkpoints or the round number, and a resumed run draws
  fresh noise.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from fedpanfm.federation.param_groups import classify

#: The joint vector's entry for a site's organ saliency (no state-dict key looks like it).
SALIENCY = "fedpanfm:saliency"


def dp_keys(state: Mapping[str, Tensor]) -> list[str]:
    """The privatised keys of a state dict: every floating tensor the server averages (all but
    the teacher, the directors and the accumulators, which it derives itself)."""
    out = []
    for k, t in state.items():
        g = classify(k)
        if t.is_floating_point() and g.role != "teacher" and g.kind not in ("director", "accumulator"):
            out.append(k)
    return out


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
        keys: the keys to clip (:func:`dp_keys`); other keys are passed through.
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


def secure_generator() -> torch.Generator:
    """A CPU generator seeded with 63 bits from the OS CSPRNG: one per release, never stored."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def add_noise(state: Mapping[str, Tensor], keys: Iterable[str], std: float,
              generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """``state`` with N(0, std^2) added to every element of ``keys`` (new tensors; input untouched).

    Args:
        state: the aggregated state.
        keys: the keys to noise.
        std: the noise standard deviation (>= 0).
        generator: where the noise comes from; None (every real release): a fresh
            :func:`secure_generator`. Pass one only to reproduce noise in a test.
    """
    if std < 0 or not math.isfinite(std):
        raise ValueError(f"add_noise: std = {std} must be finite and >= 0")
    gen = generator if generator is not None else secure_generator()
    out = dict(state)
    for k in keys:
        t = state[k]
        noise = torch.randn(t.shape, generator=gen, dtype=torch.float64) * std
        out[k] = (t.to(torch.float64) + noise).to(t.dtype)
    return out


def fixed_denominator(weights: Tensor, denominator: int) -> tuple[Tensor, float]:
    """The weights of the fixed-denominator mean as a weighted mean with the previous global
    tensor as one more term: (per-site weights, weight of the previous tensor).

    ``global + sum_i w_i (x_i - global) / D`` = ``sum_i w_i x_i / D + (1 - sum_i w_i / D) global``
    with ``w_i`` = 1 for a site with a positive weight, 0 otherwise.

    Args:
        weights: (n_sites,) the group's ordinary weights (only their sign is used).
        denominator: D, the sites sampled this round (>= the number of replies).
    """
    w = (weights > 0).to(torch.float64)
    if denominator < w.numel() or denominator < 1:
        raise ValueError(f"fixed_denominator: {w.numel()} replies for {denominator} sampled sites")
    return w, float(denominator - w.sum())


__all__ = ["SALIENCY", "add_noise", "clip_delta", "delta_norm", "dp_keys", "fixed_denominator", "secure_generator"]

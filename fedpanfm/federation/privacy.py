"""Central differential privacy for the exchanged updates, and its RDP accountant.

Our reconstruction (no paper fixes it; docs/security.md):

- **Which tensors**: the student weights the server averages (every floating "student" key but
  the directors and accumulators, which the server derives itself). The statistics sent beside
  them (subjects per organ, gate mass, saliency, metrics) are NOT privatised.
- **Clipping at the server, per site**: the delta ``update - global`` over those keys is scaled
  to L2 norm <= ``clip_norm`` (:func:`clip_delta`). Clipping at the server (not the site) keeps
  the site code unchanged; it protects against the released model and whoever reads it, not
  against the server itself (central DP: the server is trusted).
- **Noise on the aggregate**: the aggregate is a weighted mean, so one site moves it by at most
  ``clip_norm * max_i w_i / sum_i w_i`` (its largest weight share over every group); Gaussian
  noise of std ``noise_multiplier`` times that is added to every privatised key of the mean
  before the teacher and directors are derived from it (so nothing un-noised leaves the server).
- **Accounting**: :func:`epsilon` composes the Renyi DP of the sampled Gaussian mechanism
  (Mironov, Talwar & Zhang 2019, integer orders) over the rounds with sampling rate
  ``fraction_train`` and converts to (epsilon, delta). Flower samples a fixed number of sites
  without replacement, not Poisson sampling: the amplification by sampling is then a heuristic;
  with fraction_train = 1 (the default) the bound is exact for the Gaussian mechanism.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from fedpanfm.federation.param_groups import classify

DEFAULT_ORDERS: tuple[int, ...] = tuple(range(2, 257))


def dp_keys(state: Mapping[str, Tensor]) -> list[str]:
    """The privatised keys of a state dict: floating student weights the server averages."""
    return [k for k, t in state.items() if t.is_floating_point()
            and classify(k).role == "student" and classify(k).kind not in ("director", "accumulator")]


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


def add_noise(state: Mapping[str, Tensor], keys: Iterable[str], std: float, generator: torch.Generator) -> dict[str, Tensor]:
    """``state`` with N(0, std^2) added to every element of ``keys`` (new tensors; input untouched).

    Args:
        state: the aggregated state.
        keys: the keys to noise.
        std: the noise standard deviation (>= 0).
        generator: the CPU generator drawing the noise (seeded per round by the caller, so a
            resumed run draws the same noise).
    """
    if std < 0 or not math.isfinite(std):
        raise ValueError(f"add_noise: std = {std} must be finite and >= 0")
    out = dict(state)
    for k in keys:
        t = state[k]
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float64) * std
        out[k] = (t.to(torch.float64) + noise).to(t.dtype)
    return out


def _logsumexp(xs: Sequence[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def rdp_sampled_gaussian(q: float, sigma: float, order: int) -> float:
    """Renyi DP at integer ``order`` of one sampled Gaussian mechanism step.

    ``log(sum_k C(a,k) (1-q)^(a-k) q^k exp((k^2 - k) / (2 sigma^2))) / (a - 1)`` (Mironov et al.
    2019, integer alpha); q = 1 gives the plain Gaussian mechanism's ``a / (2 sigma^2)``.

    Args:
        q: sampling rate in [0, 1].
        sigma: noise multiplier (std / sensitivity), > 0.
        order: Renyi order alpha >= 2.
    """
    if not 0.0 <= q <= 1.0 or sigma <= 0 or order < 2:
        raise ValueError(f"rdp_sampled_gaussian: need q in [0,1], sigma > 0, order >= 2 (got {q}, {sigma}, {order})")
    if q == 0.0:
        return 0.0
    if q == 1.0:
        return order / (2.0 * sigma ** 2)
    terms = []
    for k in range(order + 1):
        log_binom = math.lgamma(order + 1) - math.lgamma(k + 1) - math.lgamma(order - k + 1)
        terms.append(log_binom + (order - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma ** 2))
    return _logsumexp(terms) / (order - 1)


def epsilon(q: float, sigma: float, rounds: int, delta: float, orders: Sequence[int] = DEFAULT_ORDERS) -> float:
    """(epsilon, delta)-DP after ``rounds`` compositions: min over orders of
    ``rounds * RDP(a) + log(1/delta) / (a - 1)``; inf without noise.

    Args:
        q: per-round sampling rate of sites (``fraction_train``).
        sigma: noise multiplier.
        rounds: rounds released so far.
        delta: the target delta in (0, 1).
        orders: integer Renyi orders to minimise over.
    """
    if rounds <= 0:
        return 0.0
    if sigma <= 0:
        return math.inf
    if not 0 < delta < 1:
        raise ValueError(f"epsilon: delta = {delta} must be in (0, 1)")
    return min(rounds * rdp_sampled_gaussian(q, sigma, a) + math.log(1 / delta) / (a - 1) for a in orders)


__all__ = ["add_noise", "clip_delta", "delta_norm", "dp_keys", "epsilon", "rdp_sampled_gaussian"]

"""Privacy accounting of the federation's releases: epsilon after k rounds, and the budget.

Each round releases one Gaussian mechanism (fedpanfm/federation/privacy.py): noise std
``noise_multiplier * clip_norm / D`` on a sum whose sensitivity to adding or removing one site is
``clip_norm / D``, so noise multiplier ``z = noise_multiplier`` and the Renyi DP of one round at
order ``a`` is ``a / (2 z^2)`` (Mironov 2017, Gaussian mechanism); rounds compose additively.

Sampling (our choice, docs/security.md): Flower samples ``max(int(n * fraction_train),
min_sites)`` of the ``n`` sites without replacement. Amplification by that sampling is NOT
claimed: the epsilon reported is the Gaussian mechanism's, exact when every site is sampled and
an upper bound otherwise. The libraries that account for sampling without replacement (Google's
``dp-accounting``, behind Flower's ``RdpAccountant``) cannot be installed beside Flower 1.41 here
(dp-accounting 0.6 pins ``attrs<24``; Flower's dependencies need ``attrs`` 26), so we implement
the one case we claim with dp-accounting's own orders and RDP -> (epsilon, delta) conversion
(``compute_epsilon``: Canonne, Kamath & Steinke 2020, Prop. 12), and tests/federation/test_dp_accounting.py
checks the numbers against values dp-accounting 0.6.0 computed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

#: dp-accounting's ``DEFAULT_RDP_ORDERS`` (rdp_privacy_accountant.py), so our optimum is theirs.
RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64))
                                      + [128, 256, 512, 1024])


def rdp_to_epsilon(orders: Sequence[float], rdp: Sequence[float], delta: float) -> tuple[float, float]:
    """(epsilon, optimal order) from RDP values, as dp-accounting's ``compute_epsilon`` does.

    Args:
        orders: Renyi orders (> 1).
        rdp: the RDP at each order.
        delta: target delta in (0, 1).
    """
    if not 0 < delta < 1:
        raise ValueError(f"rdp_to_epsilon: delta = {delta} must be in (0, 1)")
    best, best_order = math.inf, orders[0]
    for a, r in zip(orders, rdp, strict=True):
        if r < 0 or delta ** 2 + math.expm1(-r) > 0:
            eps = 0.0  # the KL bound already gives delta
        elif a > 1.01:
            eps = r + math.log1p(-1 / a) - math.log(delta * a) / (a - 1)
        else:
            eps = math.inf
        if eps < best:
            best, best_order = eps, a
    return max(0.0, best), best_order


@dataclass(frozen=True)
class GaussianAccountant:
    """Epsilon of ``rounds`` Gaussian releases at one noise multiplier, and the rounds a budget allows.

    Args:
        noise_multiplier: noise std / sensitivity (``federation.dp.noise_multiplier``).
        delta: the target delta of the reported (epsilon, delta).
        max_epsilon: the budget; 0 = none.
    """

    noise_multiplier: float
    delta: float
    max_epsilon: float = 0.0

    def epsilon(self, rounds: int) -> float:
        """Epsilon after ``rounds`` released rounds (0 before any; inf without noise)."""
        if rounds <= 0:
            return 0.0
        if self.noise_multiplier <= 0:
            return math.inf
        per_order = [rounds * a / (2.0 * self.noise_multiplier ** 2) for a in RDP_ORDERS]
        return rdp_to_epsilon(RDP_ORDERS, per_order, self.delta)[0]

    def rounds_within_budget(self, planned: int) -> int:
        """The most rounds, up to ``planned``, whose epsilon stays <= ``max_epsilon`` (all of
        them without a budget). Epsilon grows with the rounds, so the first that would exceed
        the budget ends the run."""
        if self.max_epsilon <= 0:
            return planned
        k = 0
        while k < planned and self.epsilon(k + 1) <= self.max_epsilon:
            k += 1
        return k


__all__ = ["GaussianAccountant", "RDP_ORDERS", "rdp_to_epsilon"]

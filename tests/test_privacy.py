"""Central DP: clipping, calibrated noise in the aggregation, and the RDP accountant."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import fake_site_update, global_model_state, tiny_config

from fedpanfm.federation.aggregate import aggregate_round
from fedpanfm.federation.privacy import clip_delta, delta_norm, dp_keys, epsilon, rdp_sampled_gaussian


def test_clip_scales_the_delta_to_the_bound() -> None:
    g = {"a": torch.zeros(2), "b": torch.zeros(1)}
    s = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}
    clipped, norm = clip_delta(s, g, ["a", "b"], 1.0)
    assert norm == pytest.approx(5.0)
    assert torch.allclose(clipped["a"], torch.tensor([0.6, 0.0])) and torch.allclose(clipped["b"], torch.tensor([0.8]))
    assert delta_norm(clipped, g, ["a", "b"]) == pytest.approx(1.0)
    same, _ = clip_delta(s, g, ["a", "b"], 10.0)
    assert same["a"] is s["a"]  # within the bound: untouched


def test_rdp_plain_gaussian_closed_form_and_amplification() -> None:
    sigma, delta, rounds = 2.0, 1e-5, 10
    # q = 1: RDP(a) = a / (2 sigma^2); minimise T a / (2 s^2) + log(1/d) / (a - 1) by hand over integers.
    by_hand = min(rounds * a / (2 * sigma ** 2) + math.log(1 / delta) / (a - 1) for a in range(2, 257))
    assert epsilon(1.0, sigma, rounds, delta) == pytest.approx(by_hand)
    assert rdp_sampled_gaussian(1.0, sigma, 8) == pytest.approx(8 / 8)
    # Sampling amplifies privacy; more noise or fewer rounds cost less.
    assert epsilon(0.1, sigma, rounds, delta) < epsilon(1.0, sigma, rounds, delta)
    assert epsilon(1.0, 4.0, rounds, delta) < epsilon(1.0, sigma, rounds, delta) < epsilon(1.0, sigma, 20, delta)
    assert epsilon(1.0, 0.0, 3, delta) == math.inf and epsilon(0.5, 1.0, 0, delta) == 0.0
    # Binomial expansion at q < 1, order 2, by hand: log(1 - q + q e^{1/s^2}) ... (k=0,1,2 terms).
    q = 0.3
    a2 = (1 - q) ** 2 + 2 * (1 - q) * q + q ** 2 * math.exp(1 / sigma ** 2)
    assert rdp_sampled_gaussian(q, sigma, 2) == pytest.approx(math.log(a2))


def test_dp_changes_the_update_and_still_trains() -> None:
    base = ["federation.dp.clip_norm=0.5", "federation.dp.noise_multiplier=0.3"]
    cfg_dp = tiny_config(["federation.dp.enabled=true", *base])
    cfg = tiny_config(base)
    g = global_model_state(cfg)
    updates = [fake_site_update(cfg, g, f"s{i}", 4 + i, seed=i, scale=0.05) for i in range(3)]
    plain, _ = aggregate_round(g, updates, cfg, 1)
    noisy, outcome = aggregate_round(g, updates, cfg_dp, 1)
    keys = dp_keys(g)
    assert keys and all(torch.isfinite(noisy[k]).all() for k in noisy if noisy[k].is_floating_point())
    assert any(not torch.equal(noisy[k], plain[k]) for k in keys)
    # std = z * C * the largest weight share of any site in any group: at least 6 of 15 subjects
    # (the shared groups), at most 1 (one site alone).
    assert 0.3 * 0.5 * 6 / 15 - 1e-12 <= outcome.metrics["dp/noise_std"] <= 0.3 * 0.5
    # Still trains: the global model moved away from where it started, and by a bounded amount
    # (each site's delta clipped to 0.5: the noise-free mean moves by at most 0.5).
    moved = delta_norm(noisy, g, keys)
    assert moved > 0
    no_noise = tiny_config(["federation.dp.enabled=true", "federation.dp.clip_norm=0.5", "federation.dp.noise_multiplier=0"])
    clipped, _ = aggregate_round(g, updates, no_noise, 1)
    assert 0 < delta_norm(clipped, g, keys) <= 0.5 + 1e-5
    # The noise is seeded by (seed, round): the same round draws the same noise (resume), another round not.
    again, _ = aggregate_round(g, updates, cfg_dp, 1)
    other, _ = aggregate_round(g, updates, cfg_dp, 2)
    assert all(torch.equal(again[k], noisy[k]) for k in keys)
    assert any(not torch.equal(other[k], noisy[k]) for k in keys)


def test_dp_with_an_unsupported_combination_is_refused() -> None:
    from orchestration.strategy import FedPanFM

    with pytest.raises(ValueError, match="teacher_policy"):
        FedPanFM(tiny_config(["federation.dp.enabled=true", "federation.teacher_policy=aggregate"]), total_steps=3)
    with pytest.raises(ValueError, match="robust"):
        FedPanFM(tiny_config(["federation.dp.enabled=true", "federation.robust=median"]), total_steps=3)

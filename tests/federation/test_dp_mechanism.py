"""Central DP that holds: fresh unpredictable noise, the fixed-denominator sensitivity bound
measured by removing sites, and nothing un-noised in what the server sends back."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import fake_site_update, global_model_state, tiny_config

from fedpanfm.federation.aggregate import aggregate_round
from fedpanfm.federation.param_groups import classify
from fedpanfm.federation.planning import RoundPlan
from fedpanfm.federation.privacy import SALIENCY, add_noise, dp_keys, secure_generator

DP = ["federation.dp.enabled=true", "federation.dp.clip_norm=0.5"]


def _updates(cfg, g, n: int = 4):
    # Different organ sets and sizes, so groups have different holders.
    holds = [[1.0] * 7, [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0], [1.0] * 6 + [0.0]]
    out = []
    for i in range(n):
        subjects = 4 + 3 * i
        out.append(fake_site_update(cfg, g, f"s{i}", subjects, organ_subjects=[subjects * h for h in holds[i % 4]],
                                    seed=i, scale=0.05))
    return out


def test_same_config_twice_releases_different_weights_and_the_seed_does_not_predict_them() -> None:
    cfg = tiny_config([*DP, "federation.dp.noise_multiplier=1.0"])
    g = global_model_state(cfg)
    ups = _updates(cfg, g)
    plan = RoundPlan(sampled=4, steps=3.0)
    a, _ = aggregate_round(g, ups, cfg, 1, plan=plan)
    b, _ = aggregate_round(g, ups, cfg, 1, plan=plan)
    keys = dp_keys(g)
    assert all(not torch.equal(a[k], b[k]) for k in keys if g[k].numel() > 1)
    # The old scheme seeded the noise with (seed, round), both in every checkpoint: regenerating
    # it recovered the clean mean. That noise no longer matches what was added.
    clean, _ = aggregate_round(g, ups, tiny_config([*DP, "federation.dp.noise_multiplier=0"]), 1, plan=plan)
    old_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 1)
    guessed = add_noise(clean, keys, 1.0 * 0.5 / 4, old_gen)
    assert all(not torch.allclose(guessed[k], a[k]) for k in keys if g[k].numel() > 1)
    # The noise is what the docs state: std z * C / D, mean 0, on every privatised element.
    resid = torch.cat([(a[k].double() - clean[k].double()).flatten() for k in keys])
    assert resid.std().item() == pytest.approx(0.5 / 4, rel=0.05)
    assert abs(resid.mean().item()) < 4 * (0.5 / 4) / math.sqrt(resid.numel())


def test_secure_generators_differ() -> None:
    draws = {float(torch.randn(1, generator=secure_generator())) for _ in range(8)}
    assert len(draws) == 8


def test_removing_one_site_moves_the_mean_by_at_most_clip_over_sampled() -> None:
    """The documented sensitivity, measured: every site removed in turn (and every pair swapped
    for a fresh site) moves the un-noised released state by <= C / D in L2 over everything
    privatised (weights, centres, masker, saliency). The weighted mean the issue found moved by
    up to 2 C s."""
    C = 0.5
    cfg = tiny_config([*DP, f"federation.dp.clip_norm={C}", "federation.dp.noise_multiplier=0"])
    g = global_model_state(cfg)
    ups = _updates(cfg, g, 4)
    # Make the deltas large so every site is clipped to exactly C (the worst case).
    for u in ups:
        for k in dp_keys(g):
            u.state[k] = g[k] + 10 * (u.state[k] - g[k])
    D = 5  # five sampled, four replied: the denominator is what was sampled, not what arrived
    plan = RoundPlan(sampled=D, steps=3.0)
    keys = dp_keys(g)

    def released(updates):
        state, outcome = aggregate_round(g, updates, cfg, 1, plan=plan)
        return {**{k: state[k].double() for k in keys}, SALIENCY: outcome.saliency}

    def dist(a, b) -> float:
        return math.sqrt(sum(float((a[k] - b[k]).pow(2).sum()) for k in keys))

    full = released(ups)
    moves = [dist(full, released([u for u in ups if u is not out])) for out in ups]
    assert max(moves) <= C / D * (1 + 1e-5)
    assert max(moves) > 0.5 * C / D  # the bound is tight, not vacuous
    # The old estimator (weighted mean, data-dependent denominator) breaks the bound it claimed.
    plain = tiny_config(["federation.subject_cap=0", "federation.update_norm_cap=0"])
    clipped = [u for u in ups]

    def weighted(updates):
        state, _ = aggregate_round(g, updates, plain, 1)
        return {k: state[k].double() for k in keys}

    w_full = weighted(clipped)
    assert max(dist(w_full, weighted([u for u in clipped if u is not out])) for out in clipped) > C / D


def test_every_float_sent_back_is_noised_or_derived_from_noised_values(monkeypatch) -> None:
    """What leaves the server is a function of the noised means only: change one site's
    statistics that DP does not cover (gate mass, subjects, steps, metrics) and nothing the
    server sends back changes; the centres and the masker, un-noised before, now get noise."""
    import fedpanfm.federation.privacy as privacy

    cfg = tiny_config([*DP, "federation.dp.noise_multiplier=1.0"])
    g = global_model_state(cfg)
    ups = _updates(cfg, g, 3)
    plan = RoundPlan(sampled=3, steps=3.0)

    def run(updates):
        # The same noise in both runs, so any difference comes from the statistics.
        seq = itertools.count()
        monkeypatch.setattr(privacy, "secure_generator", lambda: torch.Generator().manual_seed(1234 + next(seq)))
        return aggregate_round(g, updates, cfg, 1, plan=plan)

    a, out_a = run(ups)
    tweaked = []
    for u in ups:
        v = fake_site_update(cfg, g, u.site, u.num_examples, organ_subjects=u.organ_subjects.tolist(), seed=0)
        v.state = u.state
        v.saliency = u.saliency
        v.gate_mass = u.gate_mass * 0.5 + 0.01  # other routing statistics
        v.steps = 1
        v.metrics = {"loss/total": 123.0}
        tweaked.append(v)
    b, out_b = run(tweaked)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    assert torch.equal(out_a.saliency, out_b.saliency)
    for key in ("dino_loss.center", "ibot_loss.center", "masker.local_saliency"):
        clean = sum(u.state[key].double() for u in ups) / 3
        assert not torch.allclose(a[key].double(), clean, atol=1e-3), key
    # Directors come from the noised experts only (uniform expert weights under DP).
    assert any(classify(k).kind == "director" and not torch.equal(a[k], g[k]) for k in a)


def test_dp_round_without_a_plan_is_refused() -> None:
    cfg = tiny_config(DP)
    g = global_model_state(cfg)
    with pytest.raises(ValueError, match="plan"):
        aggregate_round(g, _updates(cfg, g, 2), cfg, 1)

"""Coordinate-wise median and trimmed mean against numpy, and in the aggregation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import fake_site_update, global_model_state, tiny_config

from fedpanfm.federation.aggregate import aggregate_round
from fedpanfm.federation.param_groups import classify
from fedpanfm.federation.robust import coordinate_median, trimmed_mean


def _numpy_trim_mean(x: np.ndarray, fraction: float) -> np.ndarray:
    k = int(np.floor(fraction * x.shape[0]))
    return np.sort(x, axis=0)[k: x.shape[0] - k].mean(axis=0)


@pytest.mark.parametrize("n", [1, 2, 5, 6])
def test_median_and_trimmed_mean_match_numpy(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    ts = [torch.randn(3, 4, generator=g) for _ in range(n)]
    x = np.stack([t.numpy() for t in ts]).astype(np.float64)
    assert np.allclose(coordinate_median(ts).numpy(), np.median(x, axis=0), atol=1e-6)
    for frac in (0.0, 0.2, 0.4):
        assert np.allclose(trimmed_mean(ts, frac).numpy(), _numpy_trim_mean(x, frac), atol=1e-6)
    assert coordinate_median(ts).dtype == torch.float32


def test_hand_computed_and_errors() -> None:
    ts = [torch.tensor([1.0, 10.0]), torch.tensor([2.0, -5.0]), torch.tensor([100.0, 0.0]), torch.tensor([3.0, 1.0])]
    assert torch.equal(coordinate_median(ts), torch.tensor([2.5, 0.5]))
    assert torch.equal(trimmed_mean(ts, 0.25), torch.tensor([2.5, 0.5]))
    with pytest.raises(ValueError, match="fraction"):
        trimmed_mean(ts, 0.5)
    with pytest.raises(ValueError, match="tensor 1 has shape"):
        coordinate_median([torch.zeros(2), torch.zeros(3)])


def test_median_resists_one_hostile_site_in_the_shared_backbone() -> None:
    cfg = tiny_config(["federation.robust=median"])
    g = global_model_state(cfg)
    honest = [fake_site_update(cfg, g, f"s{i}", 5, seed=i, scale=0.01) for i in range(4)]
    hostile = fake_site_update(cfg, g, "evil", 5, seed=9, scale=0.0)
    hostile.state = {k: (v + 1e3 if v.is_floating_point() else v) for k, v in hostile.state.items()}
    state, _ = aggregate_round(g, [*honest, hostile], cfg, 1)
    shared = [k for k in g if classify(k).kind == "shared" and classify(k).role == "student" and g[k].is_floating_point()]
    assert shared
    for k in shared:
        ref = np.median(np.stack([u.state[k].numpy() for u in [*honest, hostile]]), axis=0)
        assert np.allclose(state[k].numpy(), ref, atol=1e-6), k
        assert (state[k] - g[k]).abs().max() < 1.0  # the mean would have moved by ~200

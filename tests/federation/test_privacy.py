"""Central DP: clipping, and the configurations DP refuses (the estimator, the noise and the
accountant: tests/federation/test_dp_*.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from fedpanfm.federation.deltas import clip_delta, delta_norm


def test_clip_scales_the_delta_to_the_bound() -> None:
    g = {"a": torch.zeros(2), "b": torch.zeros(1)}
    s = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}
    clipped, norm = clip_delta(s, g, ["a", "b"], 1.0)
    assert norm == pytest.approx(5.0)
    assert torch.allclose(clipped["a"], torch.tensor([0.6, 0.0])) and torch.allclose(clipped["b"], torch.tensor([0.8]))
    assert delta_norm(clipped, g, ["a", "b"]) == pytest.approx(1.0)
    same, _ = clip_delta(s, g, ["a", "b"], 10.0)
    assert same["a"] is s["a"]  # within the bound: untouched


def test_dp_with_an_unsupported_combination_is_refused() -> None:
    from orchestration.strategy import FedPanFM

    with pytest.raises(ValueError, match="teacher_policy"):
        FedPanFM(tiny_config(["federation.dp.enabled=true", "federation.teacher_policy=aggregate"]), total_steps=3)
    with pytest.raises(ValueError, match="robust"):
        FedPanFM(tiny_config(["federation.dp.enabled=true", "federation.robust=median"]), total_steps=3)

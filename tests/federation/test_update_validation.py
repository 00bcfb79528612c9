"""check_update rejects each kind of malformed or hostile update with a reason naming the site."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import fake_site_update, global_model_state, tiny_config

from fedpanfm.federation.protocol import SiteUpdate
from fedpanfm.federation.tensor_codec import MessageError
from fedpanfm.federation.validation import check_update


@pytest.fixture
def setup():
    cfg = tiny_config(["federation.max_update_norm=5.0", "federation.max_site_subjects=100"])
    return cfg, global_model_state(cfg)


def test_a_normal_update_passes(setup) -> None:
    cfg, g = setup
    check_update(fake_site_update(cfg, g, "ok", 8, scale=0.001), g, cfg)


def test_update_norm_beyond_the_bound(setup) -> None:
    cfg, g = setup
    u = fake_site_update(cfg, g, "big", 8, scale=0.0)
    key = "student.encoder.norm.weight"
    u.state[key] = g[key] + 3.0  # ||delta|| = 3 * sqrt(dim) = 3 * sqrt(32) ~ 17 > 5
    with pytest.raises(MessageError, match=r"site big: update norm .* = 16\.97 exceeds federation.max_update_norm = 5"):
        check_update(u, g, cfg)
    u.state[key] = g[key] + 0.5  # 0.5 * sqrt(32) ~ 2.8 < 5
    check_update(u, g, cfg)
    off = tiny_config(["federation.max_update_norm=0"])  # 0 = no bound
    u.state[key] = g[key] + 100.0
    check_update(u, g, off)


def test_absurd_subject_count(setup) -> None:
    cfg, g = setup
    with pytest.raises(MessageError, match="site liar: claims 101 training subjects.*max_site_subjects = 100"):
        check_update(fake_site_update(cfg, g, "liar", 101, scale=0.0), g, cfg)


def test_gate_mass_beyond_what_the_subjects_can_route(setup) -> None:
    cfg, g = setup
    u = fake_site_update(cfg, g, "greedy", 4, scale=0.0)
    u.gate_mass = u.gate_mass.clone()
    u.gate_mass[1, 2] = 4.5  # 4 subjects x 1 epoch, gates <= 1
    with pytest.raises(MessageError, match="site greedy: gate mass 4.5 of block 1 expert 2 exceeds"):
        check_update(u, g, cfg)


def test_wrong_dtype(setup) -> None:
    cfg, g = setup
    key = "student.encoder.norm.weight"
    u = fake_site_update(cfg, g, "cast", 4, scale=0.0)
    u.state[key] = g[key].to(torch.int64)
    with pytest.raises(MessageError, match=f"site cast: '{key}' is torch.int64 \\(32,\\), the global model has torch.float32"):
        check_update(u, g, cfg)
    # An integer buffer must keep its exact integer dtype.
    g2 = {**g, "student.step": torch.zeros((), dtype=torch.int64)}
    u.state = {**{k: v.clone() for k, v in g.items()}, "student.step": torch.zeros((), dtype=torch.int32)}
    with pytest.raises(MessageError, match="site cast: 'student.step' is torch.int32, the global model has torch.int64"):
        check_update(u, g2, cfg)


def test_wrong_shape_missing_and_extra_keys(setup) -> None:
    cfg, g = setup
    key = "student.encoder.norm.weight"
    u = fake_site_update(cfg, g, "shape", 4, scale=0.0)
    u.state[key] = torch.zeros(3)
    with pytest.raises(MessageError, match="site shape: 'student.encoder.norm.weight' is torch.float32 \\(3,\\)"):
        check_update(u, g, cfg)
    u = fake_site_update(cfg, g, "missing", 4, scale=0.0)
    del u.state[key]
    with pytest.raises(MessageError, match="site missing: 1 weights missing"):
        check_update(u, g, cfg)
    u = fake_site_update(cfg, g, "extra", 4, scale=0.0)
    u.state["student.backdoor"] = torch.zeros(1)
    with pytest.raises(MessageError, match="site extra: unknown weight 'student.backdoor'"):
        check_update(u, g, cfg)


def test_nan_and_negative_weights_are_refused_on_decode(setup) -> None:
    cfg, g = setup
    u = fake_site_update(cfg, g, "nan", 4, scale=0.0)
    u.state["student.encoder.norm.weight"] = torch.full_like(g["student.encoder.norm.weight"], math.inf)
    with pytest.raises(MessageError, match="site nan.*holds NaN or Inf"):
        SiteUpdate.from_recorddict(u.to_recorddict())
    rd = fake_site_update(cfg, g, "neg", 4, scale=0.0).to_recorddict()
    rd["metrics"]["organ-subjects"] = [-1.0] * 7
    with pytest.raises(MessageError, match=r"site neg.*'organ-subjects'\[0\] = -1.0"):
        SiteUpdate.from_recorddict(rd)

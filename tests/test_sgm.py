"""Saliency-Guided Masking: attention shares, probabilities, sampling invariants, federation blend."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_batch, tiny_config

from fedpanfm.organs import OrganSet
from fedpanfm.sgm import OrganMasker, organ_attention_shares, water_fill

ORGANS = OrganSet()


def _masker(policy: str = "sgm", **kw: float) -> OrganMasker:
    cfg = dataclasses.replace(tiny_config().train.masking, policy=policy, **kw)
    return OrganMasker(ORGANS, cfg)


def test_organ_attention_shares_sum_attention_per_organ() -> None:
    # subject 0: CLS, 2 tokens of organ 1, 1 token of organ 3; subject 1: CLS, organ 0 token, pad x2
    cls_attn = torch.tensor([[0.2, 0.3, 0.1, 0.4], [0.5, 0.5, 0.0, 0.0]])
    organ_id = torch.tensor([[-1, 1, 1, 3], [-1, 0, -1, -1]])
    shares = organ_attention_shares(cls_attn, organ_id, 7)
    want = torch.zeros(2, 7)
    want[0, 1], want[0, 3], want[1, 0] = 0.5, 0.5, 1.0
    assert torch.allclose(shares, want)
    with pytest.raises(ValueError, match="vocabulary"):
        organ_attention_shares(cls_attn, organ_id + 7, 7)


def test_update_uses_only_subjects_with_the_organ_and_relative_units() -> None:
    m = _masker(saliency_momentum=0.5)
    present = torch.zeros(2, 7, dtype=torch.bool)
    present[0, [0, 1]] = True
    present[1, [1, 2, 3, 4]] = True
    shares = torch.zeros(2, 7)
    shares[0, [0, 1]] = torch.tensor([0.25, 0.75])
    shares[1, [1, 2, 3, 4]] = 0.25
    m.update(shares, present)
    # relative = |P| * share: organ 1 -> mean(1.5, 1.0); first observation sets it directly
    assert m.local_saliency[:5].tolist() == pytest.approx([0.5, 1.25, 1.0, 1.0, 1.0])
    assert torch.isnan(m.local_estimate()[5:]).all()
    m.update(shares[:1], present[:1])
    assert m.local_saliency[1].item() == pytest.approx(0.5 * 1.25 + 0.5 * 1.5)
    assert m.local_saliency[2].item() == pytest.approx(1.0)  # organ 2 absent: unchanged


def test_water_fill_hits_target_and_caps_at_one() -> None:
    w = torch.tensor([[0.8, 0.1, 0.1, 0.0]])
    present = torch.tensor([[True, True, True, False]])
    p = water_fill(w, present, torch.tensor([1.5]))
    assert p.sum().item() == pytest.approx(1.5)
    assert p[0].tolist() == pytest.approx([1.0, 0.25, 0.25, 0.0])


def _dominant(m: OrganMasker) -> None:
    """Adipose (index 2) draws 70 % of the attention in subjects holding all seven organs."""
    shares = torch.full((1, 7), 0.05)
    shares[0, 2] = 0.70
    m.update(shares, torch.ones(1, 7, dtype=torch.bool))


def test_sgm_masks_dominant_organ_more_than_random_with_same_expected_ratio() -> None:
    sgm, rnd = _masker("sgm"), _masker("random")
    _dominant(sgm)
    _dominant(rnd)
    present = torch.ones(4000, 7, dtype=torch.bool)
    present[:2000, 0] = False  # half the subjects lack the brain
    p_sgm, p_rnd = sgm.probabilities(present), rnd.probabilities(present)
    assert torch.allclose(p_sgm.sum(1), p_rnd.sum(1))
    assert torch.allclose(p_rnd.sum(1), 0.3 * present.sum(1).float())
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    ms, mr = sgm.sample(present, g1), rnd.sample(present, g2)
    rate_s, rate_r = sgm.metrics(), rnd.metrics()
    assert rate_s["mask_rate/adipose"] > 0.8 > 0.4 > rate_r["mask_rate/adipose"]
    assert rate_s["mask_rate/kidney"] < rate_r["mask_rate/kidney"]
    # same expected total: empirical masked-organ ratios agree within sampling noise
    ratio_s = ms.sum().item() / present.sum().item()
    ratio_r = mr.sum().item() / present.sum().item()
    assert ratio_s == pytest.approx(0.3, abs=0.02) and ratio_r == pytest.approx(0.3, abs=0.02)
    assert rate_s["saliency/adipose"] == pytest.approx(0.70, abs=1e-6)
    assert not ms[:2000, 0].any()  # never masks an absent organ


def test_temperature_flattens_sgm_towards_random() -> None:
    hot = _masker("sgm", temperature=1000.0)
    _dominant(hot)
    p = hot.probabilities(torch.ones(1, 7, dtype=torch.bool))
    assert torch.allclose(p, torch.full((1, 7), 0.3), atol=1e-3)


@pytest.mark.parametrize("policy", ["sgm", "random"])
def test_no_subject_loses_all_organs(policy: str) -> None:
    m = _masker(policy, organ_mask_ratio=0.95)
    _dominant(m)
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        present = torch.rand(64, 7, generator=g) < torch.rand(64, 1, generator=g)
        mask = m.sample(present, g)
        assert not (mask & ~present).any()
        has = present.any(1)
        assert (present.sum(1)[has] - mask.sum(1)[has] >= 1).all()
    if policy == "sgm":
        # a subject with only adipose and kidney drawn fully masked keeps the less salient kidney
        m2 = _masker("sgm", organ_mask_ratio=0.95)
        _dominant(m2)
        present = torch.zeros(500, 7, dtype=torch.bool)
        present[:, [2, 4]] = True
        mask = m2.sample(present, torch.Generator().manual_seed(0))
        assert mask[:, 2].float().mean() > 0.9 and mask[:, 4].float().mean() < 0.1


def test_none_policy_masks_nothing() -> None:
    m = _masker("none")
    assert not m.sample(torch.ones(8, 7, dtype=torch.bool)).any()


def test_global_blend_changes_probabilities_of_an_organ_never_seen() -> None:
    m = _masker("sgm")
    shares = torch.zeros(1, 7)
    shares[0, :6] = 1 / 6
    present = torch.zeros(1, 7, dtype=torch.bool)
    present[0, :6] = True  # this site never sees the pancreas (index 6)
    m.update(shares, present)
    query = torch.ones(1, 7, dtype=torch.bool)
    before = m.probabilities(query)[0, 6].item()
    g = torch.full((7,), float("nan"))
    g[6] = 4.0  # elsewhere the pancreas is strongly attended
    m.set_global(g)
    after = m.probabilities(query)[0, 6].item()
    assert after > before + 0.1
    assert m.saliency()[6].item() == pytest.approx(4.0)  # unseen locally -> global value alone
    assert m.saliency()[0].item() == pytest.approx(1.0)  # unknown globally -> local alone
    g[0] = 3.0
    m.set_global(g, weight=0.25)
    assert m.saliency()[0].item() == pytest.approx(0.25 * 3.0 + 0.75 * 1.0)
    with pytest.raises(ValueError, match="negative saliency for brain"):
        m.set_global(-torch.ones(7))


def test_state_survives_round_trip_as_plain_tensors() -> None:
    m = _masker("sgm")
    _dominant(m)
    m.set_global(torch.arange(7.0) + 1.0, weight=0.3)
    state = m.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert "stat_masked" not in state
    fresh = _masker("sgm")
    fresh.load_state_dict(state)
    present = torch.ones(3, 7, dtype=torch.bool)
    assert torch.equal(fresh.probabilities(present), m.probabilities(present))


def test_patch_mask_ratio_and_whole_organ_rows() -> None:
    cfg = tiny_config()
    batch = make_batch(cfg, [["heart", "liver"], ["heart"], ["liver", "brain"]])
    m = _masker("sgm", patch_mask_ratio=0.25)
    organ_mask = torch.zeros(3, 7, dtype=torch.bool)
    organ_mask[1, ORGANS.index("heart")] = True
    n_p = {o: cfg.data.organs[o].num_patches for o in ORGANS}
    pm = m.sample_patch_mask(batch, organ_mask, n_p, torch.Generator().manual_seed(0))
    assert set(pm) == {"heart", "liver", "brain"}
    assert pm["heart"].shape == (2, 16)
    assert pm["heart"][0].sum() == 4 and pm["heart"][1].all()  # row 1 = subject 1, organ-masked
    assert (pm["liver"].sum(1) == 2).all()  # round(0.25 * 8)
    with pytest.raises(KeyError, match="brain"):
        m.sample_patch_mask(batch, organ_mask, {"heart": 16, "liver": 8})

"""Transfer options: bf16 weights on the wire, sparse experts, and the keys a site sends."""

from __future__ import annotations

import pytest
import torch
from conftest import fake_site_update, global_model_state, tiny_config

from fedpanfm.federation.aggregate import aggregate_round, check_update, weighted_mean
from fedpanfm.federation.message import (
    BF16_STYPE,
    MessageError,
    SiteUpdate,
    arrayrecord_to_state,
    state_nbytes,
    state_to_arrayrecord,
)
from fedpanfm.federation.param_groups import classify
from fedpanfm.federation.transfer import select_transfer, unused_experts

ORGANS = ["brain", "heart", "adipose", "liver", "kidney", "spleen", "pancreas"]


def _payload(record) -> int:
    return sum(len(a.data) for a in record.values())


def test_bf16_round_trip_halves_bytes_within_bf16_precision():
    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(64, 33, generator=g) * 3, "b": torch.randn(7, generator=g), "n": torch.tensor([5, 6])}
    fp32, bf16 = state_to_arrayrecord(state), state_to_arrayrecord(state, "bf16")
    assert bf16["w"].stype == BF16_STYPE and bf16["n"].stype == "numpy.ndarray"
    float_bytes = sum(t.numel() * 4 for t in state.values() if t.is_floating_point())
    assert _payload(fp32) - _payload(bf16) >= float_bytes // 2  # floats at 2 bytes instead of 4
    assert len(bf16["w"].data) == 64 * 33 * 2
    back = arrayrecord_to_state(bf16)
    assert back["w"].dtype == torch.float32 and back["w"].shape == (64, 33)
    assert torch.equal(back["n"], state["n"])
    # bf16 keeps 8 significant bits (7 stored): round to nearest errs by at most 2^-8 relative
    rel = ((back["w"] - state["w"]).abs() / state["w"].abs()).max()
    assert 0 < rel <= 2.0**-8
    # exactly what torch's own bf16 cast gives
    assert torch.equal(back["b"], state["b"].to(torch.bfloat16).float())


def test_fp32_decode_is_exact_and_rejects_bad_payloads():
    state = {"w": torch.randn(5, 4), "i": torch.arange(6).reshape(2, 3)}
    back = arrayrecord_to_state(state_to_arrayrecord(state))
    assert all(torch.equal(back[k], state[k]) for k in state)
    rec = state_to_arrayrecord({"w": torch.tensor([1.0, float("nan")])}, "bf16")
    with pytest.raises(MessageError, match="'w' holds NaN"):
        arrayrecord_to_state(rec, "site x")
    rec = state_to_arrayrecord({"w": torch.ones(4)}, "bf16")
    rec["w"].data = rec["w"].data[:-2]
    with pytest.raises(MessageError, match="site y: array 'w' cannot be decoded"):
        arrayrecord_to_state(rec, "site y")
    with pytest.raises(MessageError, match="transfer dtype 'fp8'"):
        state_to_arrayrecord(state, "fp8")


def test_bf16_site_update_halves_float_bytes_of_a_real_model():
    cfg = tiny_config()
    g = global_model_state(cfg)
    u = fake_site_update(cfg, g, "s", 5)
    full = u.to_recorddict()["arrays"]
    u.transfer_dtype = "bf16"
    half = u.to_recorddict()["arrays"]
    floats = sum(t.numel() * 4 for t in u.state.values() if t.is_floating_point())
    assert _payload(full) - _payload(half) >= floats // 2
    back = SiteUpdate.from_recorddict(u.to_recorddict(), ORGANS)
    check_update(back, g, cfg)
    assert all(back.state[k].dtype == g[k].dtype for k in g)


def test_unused_experts_by_share():
    gm = torch.tensor([[4.0, 0.0, 0.5, 5.5], [0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    assert unused_experts(gm, 0.0).tolist() == [[False, True, False, False], [True, True, False, True]]
    # 0.5 / 10 = 5 % < 10 %; a block's top expert stays even above the threshold
    assert unused_experts(gm, 0.1).tolist() == [[False, True, True, False], [True, True, False, True]]
    assert unused_experts(gm, 0.99)[:, 3].tolist() == [False, True]


def test_select_transfer_drops_teacher_and_unused_experts():
    cfg = tiny_config(["federation.sparse_experts=true", "federation.teacher_policy=server_ema"])
    g = global_model_state(cfg)
    L, E = cfg.model.depth, cfg.model.dex.experts
    gm = torch.ones(L, E, dtype=torch.float64)
    gm[0, 1] = 0.0
    sent, reported = select_transfer(g, gm, cfg)
    assert not any(k.startswith("teacher.") for k in sent)
    omitted = {k for k in g if k not in sent and classify(k).role == "student"}
    assert omitted and all(classify(k).kind == "expert" and (classify(k).layer, classify(k).expert) == (0, 1) for k in omitted)
    assert torch.equal(reported, gm)
    assert state_nbytes(sent) < state_nbytes(g) / 2
    dense, _ = select_transfer(g, gm, tiny_config(["federation.teacher_policy=aggregate"]))
    assert list(dense) == list(g)  # aggregate policy, no sparsity: everything goes


def test_sparse_experts_aggregate_correctly_and_unused_stay_unchanged():
    cfg = tiny_config(["federation.sparse_experts=true"])
    g = global_model_state(cfg)
    L, E = cfg.model.depth, cfg.model.dex.experts
    gm_a = torch.ones(L, E, dtype=torch.float64)
    gm_a[0, 1] = 0.0  # site a never routed to expert (0, 1)
    gm_b = torch.ones(L, E, dtype=torch.float64) * 2
    gm_b[0, 1] = 0.0
    gm_b[1, 2] = 0.0  # site b not to (1, 2) either
    a = fake_site_update(cfg, g, "a", 5, gate_mass=gm_a, seed=1)
    b = fake_site_update(cfg, g, "b", 7, gate_mass=gm_b, seed=2)
    sparse = []
    for u in (a, b):
        sent, reported = select_transfer(u.state, u.gate_mass, cfg)
        su = SiteUpdate(u.site, sent, u.num_examples, u.organ_subjects, reported, u.saliency, u.organ_names,
                        u.metrics, u.steps, "fp32")
        sparse.append(SiteUpdate.from_recorddict(su.to_recorddict(), ORGANS))
    dense_state, _ = aggregate_round(g, [a, b], cfg, 1)
    sparse_state, _ = aggregate_round(g, sparse, cfg, 1)
    for k in g:
        assert torch.equal(sparse_state[k], dense_state[k]), k
    e01 = "student.encoder.blocks.0.mlp.experts.1.fc1.weight"
    e12 = "student.encoder.blocks.1.mlp.experts.2.fc1.weight"
    assert e01 not in sparse[0].state and e01 not in sparse[1].state and e12 not in sparse[1].state
    assert torch.equal(sparse_state[e01], g[e01])  # nobody trained it: unchanged
    assert torch.equal(sparse_state[e12], a.state[e12])  # only site a trained it: a's value
    # an omitted expert the site claims to have used is rejected, naming site and key
    bad = SiteUpdate(a.site, {k: v for k, v in sparse[0].state.items()}, 5, a.organ_subjects,
                     torch.ones(L, E, dtype=torch.float64), a.saliency, a.organ_names, steps=a.steps)
    with pytest.raises(MessageError, match="site a: .*weights missing.*experts.1"):
        check_update(bad, g, cfg)


def test_blocked_weighted_mean_matches_reference():
    g = torch.Generator().manual_seed(3)
    ts = [torch.randn(300_001, generator=g) for _ in range(3)]  # spans several blocks + a remainder
    w = [1.0, 2.0, 5.0]
    ref = (sum(wi * t.double() for wi, t in zip(w, ts)) / sum(w)).float()
    out = weighted_mean(ts, w)
    assert out is not None and out.shape == ts[0].shape
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
    ints = weighted_mean([torch.tensor([1, 3]), torch.tensor([2, 4])], [1.0, 1.0])
    assert ints is not None and ints.dtype == torch.int64 and ints.tolist() == [2, 4]  # 1.5 -> 2, 3.5 -> 4 (round half even)


def test_transfer_config_is_checked():
    from fedpanfm.config import ConfigError

    with pytest.raises(ConfigError, match="transfer_dtype"):
        tiny_config(["federation.transfer_dtype=fp16"])
    with pytest.raises(ConfigError, match="sparse_experts cannot be combined with federation.dp.enabled"):
        tiny_config(["federation.sparse_experts=true", "federation.dp.enabled=true"])

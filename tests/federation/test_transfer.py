"""Transfer options: bf16 weights on the wire (deltas on the uplink, bf16 downlink), sparse
experts, and the keys a site sends."""

from __future__ import annotations

import pytest
import torch
from conftest import fake_site_update, global_model_state, tiny_config

from fedpanfm.federation.aggregate import aggregate_round
from fedpanfm.federation.means import weighted_mean
from fedpanfm.federation.param_groups import classify
from fedpanfm.federation.protocol import SiteUpdate
from fedpanfm.federation.tensor_codec import (
    BF16_DELTA_STYPE,
    BF16_STYPE,
    MessageError,
    arrayrecord_to_state,
    state_nbytes,
    state_to_arrayrecord,
)
from fedpanfm.federation.transfer import select_transfer, unused_experts
from fedpanfm.federation.validation import check_update

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
    half = u.to_recorddict("bf16")["arrays"]
    floats = sum(t.numel() * 4 for t in u.state.values() if t.is_floating_point())
    assert _payload(full) - _payload(half) >= floats // 2
    back = SiteUpdate.from_recorddict(u.to_recorddict("bf16"), ORGANS)
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
                        u.metrics, u.steps)
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


# --------------------------------------------------------------------------- bf16 both ways


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def test_bf16_delta_keeps_small_updates_that_plain_bf16_loses():
    g = torch.Generator().manual_seed(4)
    ref = torch.randn(128, 96, generator=g)
    d = 1e-3 * ref.abs() * torch.randn(128, 96, generator=g)  # a round's change: ~0.1 % of the weight
    new = ref + d
    rec = state_to_arrayrecord({"w": new, "i": torch.arange(3)}, "bf16", reference={"w": ref, "i": torch.arange(3)})
    assert rec["w"].stype == BF16_DELTA_STYPE and len(rec["w"].data) == 2 * new.numel()
    assert rec["i"].stype == "numpy.ndarray"  # integers travel unchanged, never as deltas
    back = arrayrecord_to_state(rec, "site x", reference={"w": ref})
    # exactly the reference plus the bf16 of the difference the sender computed (in fp32)
    assert back["w"].dtype == torch.float32 and torch.equal(back["w"], ref + _bf16(new - ref))
    err_delta = (back["w"] - new).abs()
    # bf16 rounding of the delta (2^-8 of |d|) plus fp32 rounding of the two subtractions / additions
    assert (err_delta <= 2.0**-8 * d.abs() + 2.0**-22 * new.abs()).all()
    err_plain = (_bf16(new) - new).abs()
    assert err_plain.max() <= 2.0**-8 * new.abs().max() and err_plain.max() > 2.0**-10 * new.abs().max()
    assert err_plain.mean() > 100 * err_delta.mean()
    # plain bf16 loses most of the update outright: bf16(new) is bf16(ref) where |d| < half an ulp
    lost = (_bf16(new) == _bf16(ref)).float().mean()
    assert lost > 0.5 and not torch.equal(back["w"], ref)


def test_bf16_encoding_chooses_delta_only_for_received_floats_of_the_same_shape():
    state = {"w": torch.ones(2, 3), "b": torch.ones(3), "s": torch.ones(4), "n": torch.tensor([1, 2])}
    ref = {"w": torch.zeros(2, 3), "s": torch.zeros(5), "n": torch.tensor([1, 2])}
    rec = state_to_arrayrecord(state, "bf16", reference=ref)
    assert [rec[k].stype for k in state] == [BF16_DELTA_STYPE, BF16_STYPE, BF16_STYPE, "numpy.ndarray"]
    back = arrayrecord_to_state(rec, reference=ref)
    assert all(torch.equal(back[k], state[k].float() if k != "n" else state[k]) for k in state)
    # fp32 stays exactly what it was: a reference changes nothing
    fp32 = state_to_arrayrecord(state, "fp32", reference=ref)
    assert all(fp32[k].data == state_to_arrayrecord(state)[k].data for k in state)


def test_delta_without_its_reference_is_rejected_naming_the_key():
    rec = state_to_arrayrecord({"w": torch.ones(2, 3)}, "bf16", reference={"w": torch.zeros(2, 3)})
    with pytest.raises(MessageError, match="site x: array 'w' is a bf16 delta, but the receiver has no reference"):
        arrayrecord_to_state(rec, "site x")
    with pytest.raises(MessageError, match="site x: array 'w' is a bf16 delta of a tensor the receiver does not hold"):
        arrayrecord_to_state(rec, "site x", reference={"v": torch.zeros(2, 3)})
    with pytest.raises(MessageError, match=r"site x: array 'w' is a bf16 delta of shape \(2, 3\).*\(3, 2\)"):
        arrayrecord_to_state(rec, "site x", reference={"w": torch.zeros(3, 2)})
    with pytest.raises(MessageError, match="site x: array 'w' is a bf16 delta.*torch.int64"):
        arrayrecord_to_state(rec, "site x", reference={"w": torch.zeros(2, 3, dtype=torch.int64)})
    # finiteness is checked on the reconstructed tensor
    big = state_to_arrayrecord({"w": torch.full((2,), 3e38)}, "bf16", reference={"w": torch.zeros(2)})
    with pytest.raises(MessageError, match="site x: array 'w' holds NaN or Inf"):
        arrayrecord_to_state(big, "site x", reference={"w": torch.full((2,), 3e38)})
    # through a site's reply: the sender and the key are named
    cfg = tiny_config()
    g = global_model_state(cfg)
    u = fake_site_update(cfg, g, "s", 5, scale=1e-3)
    with pytest.raises(MessageError, match=r"node 3 \(site s\): array 'student\..*' is a bf16 delta, but"):
        SiteUpdate.from_recorddict(u.to_recorddict("bf16", reference=g), ORGANS, sender="node 3")


def test_bf16_delta_update_halves_float_bytes_and_decodes_against_the_master():
    cfg = tiny_config()
    g = global_model_state(cfg)
    received = {k: _bf16(v) if v.is_floating_point() else v for k, v in g.items()}  # what a bf16 downlink gives
    u = fake_site_update(cfg, received, "s", 5, scale=1e-3)
    full = u.to_recorddict()["arrays"]
    delta = u.to_recorddict("bf16", reference=received)["arrays"]
    floats = [k for k, t in u.state.items() if t.is_floating_point()]
    assert floats and all(delta[k].stype == BF16_DELTA_STYPE and len(delta[k].data) == 2 * u.state[k].numel()
                          for k in floats)
    assert _payload(full) - _payload(delta) >= sum(u.state[k].numel() * 4 for k in floats) // 2
    # the server adds the delta to its exact fp32 master: master + (site_new - round(master))
    back = SiteUpdate.from_recorddict(u.to_recorddict("bf16", reference=received), ORGANS, reference=g)
    check_update(back, g, cfg)
    for k in floats:
        assert torch.equal(back.state[k], g[k] + _bf16(u.state[k] - received[k])), k


# --------------------------------------------------------------------------- server: bf16 downlink


@pytest.fixture
def server_identity(monkeypatch):
    """The task identity a ServerApp process has at run time (as in tests/orchestration/test_strategy.py)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, v in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, v)


@pytest.mark.usefixtures("server_identity")
def test_strategy_sends_bf16_and_keeps_an_fp32_master():
    from flower_fakes import FakeGrid, reply

    from fedpanfm.federation.protocol import TrainInstruction
    from orchestration.strategy import FedPanFM

    # no DEX and an aggregated teacher: every floating key is the num-examples weighted mean
    cfg = tiny_config(["model.dex.enabled=false", "federation.teacher_policy=aggregate", "federation.min_sites=2",
                       "federation.transfer_dtype=bf16"])
    g = global_model_state(cfg)
    strategy = FedPanFM(cfg, total_steps=10)
    msgs = list(strategy.configure_train(1, state_to_arrayrecord(g), None, FakeGrid([1, 2])))
    sent = msgs[0].content["arrays"]
    floats = [k for k, t in g.items() if t.is_floating_point()]
    assert all(sent[k].stype == BF16_STYPE for k in floats)
    ins = TrainInstruction.from_recorddict(msgs[0].content, ORGANS)
    received = ins.state()
    assert all(torch.equal(received[k], _bf16(g[k])) for k in floats)
    ups = []
    for i, n in enumerate([3, 5]):
        ups.append(fake_site_update(cfg, received, f"s{i}", n, seed=i, scale=1e-3))
    replies = [reply(u.to_recorddict("bf16", reference=received), i + 1) for i, u in enumerate(ups)]
    strategy.identify(FakeGrid([1, 2]))  # the node table when the replies arrive (the round loop's step)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and all(arrays[k].stype == BF16_STYPE for k in floats)
    master = strategy.global_state
    assert master is not None
    for k in floats:
        deltas = [_bf16(u.state[k] - received[k]).double() for u in ups]
        expected = g[k].double() + (3 * deltas[0] + 5 * deltas[1]) / 8
        assert master[k].dtype == torch.float32
        torch.testing.assert_close(master[k].double(), expected, rtol=1e-6, atol=1e-7)
    # the master keeps fp32 precision the bf16 it sent does not have
    assert any(not torch.equal(master[k], _bf16(master[k])) for k in floats)
    # round 2 sends the bf16 of the master, taking Flower's bf16 arrays as they are
    msgs = list(strategy.configure_train(2, arrays, None, FakeGrid([1, 2])))
    assert msgs[0].content["arrays"][floats[0]].data == arrays[floats[0]].data
    again = TrainInstruction.from_recorddict(msgs[0].content).state()
    assert all(torch.equal(again[k], _bf16(master[k])) for k in floats)


@pytest.mark.usefixtures("server_identity")
def test_resumed_strategy_encodes_the_downlink_from_its_master():
    from flower_fakes import FakeGrid

    from fedpanfm.federation.protocol import TrainInstruction
    from orchestration.strategy import FedPanFM

    cfg = tiny_config(["federation.transfer_dtype=bf16", "federation.rounds=3"])
    g = global_model_state(cfg)
    strategy = FedPanFM(cfg, total_steps=30)
    strategy.resume_from(g, torch.full((7,), 1 / 7), completed_round=1)
    stale = state_to_arrayrecord({k: torch.zeros_like(v) for k, v in g.items()})  # fp32 arrays Flower hands in
    msgs = list(strategy.configure_train(1, stale, None, FakeGrid([1, 2])))
    ins = TrainInstruction.from_recorddict(msgs[0].content)
    assert ins.server_round == 2
    assert all(torch.equal(t, _bf16(g[k]) if t.is_floating_point() else g[k]) for k, t in ins.state().items())


# --------------------------------------------------------------------------- site: bf16 deltas


def test_site_replies_bf16_deltas_for_what_it_received(tmp_path):
    from conftest import one_site_run, site_message
    from flwr.app import ConfigRecord, Context, RecordDict

    from fedpanfm.federation.protocol import TrainInstruction
    from fedpanfm.model.meta_arch import PanFMSSL
    from sites.client_app import app

    cfg, run_config = one_site_run(tmp_path)
    run_config = {**run_config, "overrides": "federation.transfer_dtype=bf16"}
    organs = cfg.data.organ_set()
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 1},
                      state=RecordDict(), run_config=run_config)
    torch.manual_seed(0)
    g = {k: v.detach().float().clone() for k, v in PanFMSSL(cfg).state_dict().items()}
    instr = TrainInstruction(arrays=state_to_arrayrecord(g, "bf16"), server_round=1, num_rounds=2, start_step=0,
                             total_steps=20, global_saliency=[1.0 / len(organs)] * len(organs),
                             organ_names=list(organs.names), teacher_policy=cfg.federation.teacher_policy)
    out = app(site_message(instr.to_recorddict(), "train", 1, 7), context)
    assert not out.has_error(), out.error
    arrays = out.content["arrays"]
    floats = [k for k in arrays if g[k].is_floating_point()]
    assert floats and all(arrays[k].stype == BF16_DELTA_STYPE for k in floats)
    assert all(arrays[k].stype == "numpy.ndarray" for k in arrays if k not in floats)
    update = SiteUpdate.from_recorddict(out.content, organs.names, reference=g)
    check_update(update, g, cfg)
    assert any(not torch.equal(update.state[k], g[k]) for k in floats if k.startswith("student."))
    # evaluation reads a bf16 global state as well
    ev = app(site_message(RecordDict({"arrays": state_to_arrayrecord(g, "bf16"), "config": ConfigRecord()}),
                          "evaluate", 1, 7), context)
    assert not ev.has_error(), ev.error
    assert torch.isfinite(torch.tensor(ev.content["metrics"]["val/loss"]))

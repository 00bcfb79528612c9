"""FedPanFM against Flower's FedAvg and against hand-computed organ / expert / director rules,
with replies built as real Flower Messages."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import fake_site_update, global_model_state, tiny_config
from flower_fakes import REGISTERED, FakeGrid, reply
from flwr.app import Error, Message, MessageType
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fedpanfm.federation.aggregate import aggregate_round
from fedpanfm.federation.protocol import SiteUpdate, TrainInstruction
from fedpanfm.federation.tensor_codec import arrayrecord_to_state, state_to_arrayrecord
from orchestration.strategy import FedPanFM, RoundFailed, RoundReport


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    """The identity a ServerApp process has at run time (Flower sets it before ``main``)."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


@pytest.fixture(autouse=True)
def registry():
    REGISTERED.clear()
    yield REGISTERED


def aggregate(strategy: FedPanFM, replies: list[Message], server_round: int = 1):
    """What the round loop does with replies (FedPanFM.start): read the runtime's node table as
    it is now (the replies above registered their nodes), then ``aggregate_train``."""
    strategy.identify(FakeGrid(sorted(REGISTERED)))
    return strategy.aggregate_train(server_round, replies)


def start(cfg, state, n_nodes: int = 3, total_steps: int = 30, on_round=None) -> tuple[FedPanFM, list[Message]]:
    strategy = FedPanFM(cfg, total_steps=total_steps, on_round=on_round)
    msgs = list(strategy.configure_train(1, state_to_arrayrecord(state), None, FakeGrid(list(range(1, n_nodes + 1)))))
    return strategy, msgs


def test_equals_fedavg_with_one_organ_set_no_dex_and_aggregated_teacher():
    cfg = tiny_config(["model.dex.enabled=false", "federation.teacher_policy=aggregate", "federation.min_sites=3"])
    g = global_model_state(cfg)
    assert not any(".experts." in k or ".director." in k for k in g)
    replies = [reply(fake_site_update(cfg, g, f"s{i}", n, seed=i).to_recorddict(), i + 1) for i, n in enumerate([3, 8, 5])]
    strategy, _ = start(cfg, g)
    ours, metrics = aggregate(strategy, replies)
    theirs, _ = FedAvg().aggregate_train(1, replies)
    assert ours is not None and theirs is not None and list(ours) == list(theirs)
    a, b = arrayrecord_to_state(ours), arrayrecord_to_state(theirs)
    for k in a:
        # FedAvg accumulates in float32, we in float64: equal up to float32 rounding.
        assert torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7), k
    assert metrics is not None and metrics["sites"] == 3


def test_configure_train_sends_the_instruction():
    cfg = tiny_config(["federation.rounds=3"])
    g = global_model_state(cfg)
    strategy, msgs = start(cfg, g, n_nodes=4, total_steps=30)
    assert sorted(m.metadata.dst_node_id for m in msgs) == [1, 2, 3, 4]
    assert all(m.metadata.message_type == MessageType.TRAIN for m in msgs)
    ins = TrainInstruction.from_recorddict(msgs[0].content, cfg.data.organ_set().names)
    assert (ins.server_round, ins.num_rounds, ins.start_step, ins.total_steps) == (1, 3, 0, 30)
    assert ins.teacher_policy == cfg.federation.teacher_policy
    assert ins.global_saliency == pytest.approx([1 / 7] * 7)
    assert all(torch.equal(v, g[k]) for k, v in ins.state().items())
    # After a round: the next instruction carries the new saliency and schedule position.
    ups = [fake_site_update(cfg, g, f"s{i}", 4, seed=i) for i in range(2)]
    arrays, _ = aggregate(strategy, [reply(u.to_recorddict(), i + 1) for i, u in enumerate(ups)])
    msgs = list(strategy.configure_train(2, arrays, None, FakeGrid([1, 2])))
    ins = TrainInstruction.from_recorddict(msgs[0].content)
    assert ins.start_step == 10 and ins.server_round == 2
    assert ins.global_saliency == pytest.approx(strategy.global_saliency.tolist())
    assert ins.global_saliency != pytest.approx([1 / 7] * 7)


def test_a_site_cannot_change_an_organ_it_lacks():
    # The update-norm cap off: no_brain's 1e6 brain weights would clip its whole delta (the cap's
    # own test: tests/orchestration/test_adversarial_hooks.py); here only the organ rule is under test.
    cfg = tiny_config(["federation.teacher_policy=server_ema", "federation.update_norm_cap=0"])
    g = global_model_state(cfg)
    organs = cfg.data.organ_set()
    full = fake_site_update(cfg, g, "full", 6, organ_subjects=[6, 6, 6, 6, 6, 6, 0], seed=1)
    no_brain = fake_site_update(cfg, g, "no_brain", 9, organ_subjects=[0, 9, 9, 9, 9, 9, 0], seed=2)
    brain_keys = [k for k in g if k.startswith("student.encoder.tokenizer.organs.brain.")]
    for k in brain_keys:
        no_brain.state[k] = torch.full_like(g[k], 1e6)  # whatever it sends for brain must not count
    strategy, _ = start(cfg, g)
    arrays, _ = aggregate(strategy, [reply(full.to_recorddict(), 1), reply(no_brain.to_recorddict(), 2)])
    new = arrayrecord_to_state(arrays)
    for k in brain_keys:
        assert torch.equal(new[k], full.state[k]), k
    heart = "student.encoder.tokenizer.organs.heart.organ_embed"
    assert torch.allclose(new[heart], (6 * full.state[heart] + 9 * no_brain.state[heart]) / 15, atol=1e-6)
    for k in (k for k in g if k.startswith("student.encoder.tokenizer.organs.pancreas.")):
        assert torch.equal(new[k], g[k]), k  # nobody holds pancreas: previous global weights
    assert organs.index("pancreas") == 6


def _dex_round(cfg):
    g = global_model_state(cfg)
    gate_a = torch.tensor([[4.0, 2.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    gate_b = torch.tensor([[2.0, 2.0, 0.0, 0.0], [0.0, 3.0, 2.0, 0.0]], dtype=torch.float64)
    a = fake_site_update(cfg, g, "a", 5, gate_mass=gate_a, seed=1)
    b = fake_site_update(cfg, g, "b", 5, gate_mass=gate_b, seed=2)
    strategy, _ = start(cfg, g)
    arrays, _ = aggregate(strategy, [reply(a.to_recorddict(), 1), reply(b.to_recorddict(), 2)])
    return g, a, b, arrayrecord_to_state(arrays)


def test_experts_are_weighted_by_routed_gate_mass():
    cfg = tiny_config(["federation.teacher_policy=server_ema"])
    g, a, b, new = _dex_round(cfg)
    p = "student.encoder.blocks.0.mlp.experts.{}.fc1.weight"
    # Layer 0 expert 2: only site a routed to it -> exactly site a's weights.
    assert torch.equal(new[p.format(2)], a.state[p.format(2)])
    # Expert 3: nobody routed -> previous global.
    assert torch.equal(new[p.format(3)], g[p.format(3)])
    # Expert 0: gate mass 4 vs 2.
    assert torch.allclose(new[p.format(0)], (4 * a.state[p.format(0)] + 2 * b.state[p.format(0)]) / 6, atol=1e-6)


def test_server_group_ema_of_the_directors_by_hand():
    cfg = tiny_config(["federation.teacher_policy=server_ema", "federation.rounds=4"])
    g, a, b, new = _dex_round(cfg)
    m = cfg.model.dex.gema_momentum_start ** 3  # round 1 of the cosine, compounded over the 3 local steps each site took
    for layer, usage in ((0, [6.0, 4.0, 1.0, 0.0]), (1, [1.0, 4.0, 3.0, 0.0])):
        w = torch.tensor(usage, dtype=torch.float64) / sum(usage)
        for part in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
            d = f"student.encoder.blocks.{layer}.mlp.director.{part}"
            experts = [new[f"student.encoder.blocks.{layer}.mlp.experts.{e}.{part}"].double() for e in range(4)]
            expected = m * g[d].double() + (1 - m) * sum(w[e] * experts[e] for e in range(4))
            assert torch.allclose(new[d].double(), expected, atol=1e-6), d
            assert not torch.equal(new[d], g[d])
    # Directors the sites sent are ignored: the server's own EMA decides.
    d0 = "student.encoder.blocks.0.mlp.director.fc1.weight"
    assert not torch.allclose(new[d0], (a.state[d0] + b.state[d0]) / 2, atol=1e-3)


def test_malformed_replies_are_dropped_and_the_rest_aggregated(caplog):
    cfg = tiny_config()
    g = global_model_state(cfg)
    good = [fake_site_update(cfg, g, f"good{i}", 4 + i, seed=i) for i in range(2)]
    wrong_version = good[0].to_recorddict()
    wrong_version["site"]["protocol-version"] = 99
    wrong_version["site"]["site-name"] = "old_site"
    nan = fake_site_update(cfg, g, "nan_site", 4, seed=5)
    nan.state["student.encoder.norm.weight"][0] = float("nan")
    no_stats = fake_site_update(cfg, g, "no_stats", 4, seed=6).to_recorddict()
    del no_stats["metrics"]["num-examples"]
    replies = [
        reply(good[0].to_recorddict(), 1),
        reply(wrong_version, 11),
        reply(nan.to_recorddict(), 12),
        reply(no_stats, 13),
        reply(Error(code=0, reason="site crashed"), 14),
        reply(good[1].to_recorddict(), 2),
    ]
    reports: list[RoundReport] = []
    strategy, _ = start(cfg, g, on_round=reports.append)
    with caplog.at_level(logging.WARNING):
        arrays, metrics = aggregate(strategy, replies)
    expected, _ = aggregate_round(g, good, cfg, 1)
    new = arrayrecord_to_state(arrays)
    assert all(torch.equal(new[k], expected[k]) for k in expected)
    (report,) = reports
    assert len(report.dropped) == 4 and set(report.site_metrics) == {"good0", "good1"}
    for node, needle in ((11, "protocol version"), (12, "NaN"), (13, "num-examples"), (14, "site crashed")):
        line = next(d for d in report.dropped if f"node {node}" in d)
        assert needle in line
        assert any(f"node {node}" in r.getMessage() and needle in r.getMessage() for r in caplog.records)
    assert "nan_site" in next(d for d in report.dropped if "node 12" in d)
    assert metrics["sites"] == 2 and report.site_metrics["good1"]["subjects"] == 5.0


def test_the_aggregate_does_not_depend_on_the_order_replies_arrive_in():
    cfg = tiny_config()
    g = global_model_state(cfg)
    updates = [fake_site_update(cfg, g, f"site{i}", 3 + 2 * i, seed=i) for i in range(4)]
    results = []
    for order in ([0, 1, 2, 3], [3, 1, 0, 2], [2, 3, 1, 0]):
        REGISTERED.clear()
        strategy, _ = start(cfg, g, n_nodes=4)
        arrays, _ = aggregate(strategy, [reply(updates[i].to_recorddict(), i + 1) for i in order])
        results.append(arrayrecord_to_state(arrays))
    for other in results[1:]:
        assert all(torch.equal(results[0][k], other[k]) for k in results[0])
    # The float sums do depend on the order: this is what the sort buys, not a no-op.
    forward, _ = aggregate_round(g, updates, cfg, 1)
    backward, _ = aggregate_round(g, updates[::-1], cfg, 1)
    assert any(not torch.equal(forward[k], backward[k]) for k in forward)
    assert all(torch.equal(results[0][k], forward[k]) for k in forward)


def test_no_usable_reply_keeps_the_global_model():
    cfg = tiny_config()
    g = global_model_state(cfg)
    strategy, _ = start(cfg, g)
    # Fewer than min_sites usable replies stops the run (issue 7); the global model is untouched.
    with pytest.raises(RoundFailed, match="min_sites"):
        aggregate(strategy, [reply(Error(code=0, reason="x"), 1)])
    assert strategy.global_state is not None and all(torch.equal(strategy.global_state[k], g[k]) for k in g)


def test_duplicate_site_is_dropped():
    cfg = tiny_config(["federation.min_sites=1"])
    g = global_model_state(cfg)
    u = fake_site_update(cfg, g, "same", 4)
    strategy, _ = start(cfg, g)
    # The same node's reply delivered twice: the second is dropped.
    aggregate(strategy, [reply(u.to_recorddict(), 1), reply(u.to_recorddict(), 1)])
    assert strategy.last_report is not None and "second reply" in strategy.last_report.dropped[0]
    assert isinstance(SiteUpdate.from_recorddict(u.to_recorddict()), SiteUpdate)


def test_a_node_claiming_another_sites_name_is_refused():
    """Identity comes from the node's registration: node 2 (site "b") replying as "a" first does
    not push the genuine a out (the issue's finding), whatever the order."""
    cfg = tiny_config(["federation.min_sites=1"])
    g = global_model_state(cfg)
    a = fake_site_update(cfg, g, "a", 4, seed=1)
    fake_a = fake_site_update(cfg, g, "a", 4, seed=2)
    strategy, _ = start(cfg, g, n_nodes=2)
    arrays, _ = aggregate(strategy, [reply(fake_a.to_recorddict(), 2, registered_as="b"),
                                             reply(a.to_recorddict(), 1)])
    report = strategy.last_report
    assert report is not None and set(report.site_metrics) == {"a"} and report.failures == {"b": 1}
    assert "node 2 is site b, but its reply claims to be site 'a'" in report.dropped[0]
    new = arrayrecord_to_state(arrays)
    expected, _ = aggregate_round(g, [a], cfg, 1)
    assert all(torch.equal(new[k], expected[k]) for k in expected)

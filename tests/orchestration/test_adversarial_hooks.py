"""Malicious-site attacks at the strategy's hooks, with real Flower replies: three honest sites
and one attacker per test; the round must finish, the attack be refused or bounded as
docs/security.md states, and the honest sites' contributions stay intact. The attacks that need
the real runtime run in tests/orchestration/test_adversarial_federation.py."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import fake_site_update, global_model_state, tiny_config
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from test_strategy import REGISTERED, FakeGrid, reply, server_identity  # noqa: F401  (fixture)

from fedpanfm.federation.aggregate import aggregate_round
from fedpanfm.federation.deltas import delta_norm
from fedpanfm.federation.tensor_codec import state_to_arrayrecord
from orchestration.strategy import FedPanFM

pytestmark = pytest.mark.adversarial

HONEST = ("a", "b", "c")


def _cfg(extra: list[str] | None = None):
    return tiny_config(["federation.min_sites=3", "federation.retries=0", *(extra or [])])


def _round(cfg, g, attack, n_attacker: int = 6):
    """One round: honest a, b, c (nodes 1-3) and the attacker (node 4, registered as "evil"),
    whose reply ``attack`` builds from an honest-looking update. Returns (strategy, report,
    the honest updates)."""
    REGISTERED.clear()
    honest = [fake_site_update(cfg, g, s, 6 + i, seed=i, scale=0.05) for i, s in enumerate(HONEST)]
    evil = fake_site_update(cfg, g, "evil", n_attacker, seed=9, scale=0.05)
    strategy = FedPanFM(cfg, total_steps=30)
    strategy.configure_train(1, state_to_arrayrecord(g), None, FakeGrid([1, 2, 3, 4]))
    replies = [reply(u.to_recorddict(), i + 1) for i, u in enumerate(honest)]
    REGISTERED[4] = "evil"
    replies += [r if isinstance(r, Message) else reply(r, 4, registered_as="evil") for r in attack(evil)]
    strategy.identify(FakeGrid([1, 2, 3, 4]))  # the node table when the replies arrive (the round loop's step)
    strategy.aggregate_train(1, replies)
    assert strategy.last_report is not None
    return strategy, strategy.last_report, honest


def _refused(cfg, g, attack, reason: str) -> None:
    strategy, report, honest = _round(cfg, g, attack)
    assert set(report.site_metrics) == set(HONEST)
    assert report.failures == {"evil": 1}, report.failures
    assert any(reason in line for line in report.dropped), report.dropped
    expected, _ = aggregate_round(g, honest, cfg, 1)
    assert all(torch.equal(strategy.global_state[k], expected[k]) for k in expected)


@pytest.fixture
def setup():
    cfg = _cfg()
    return cfg, global_model_state(cfg)


def test_nan_metric_is_refused(setup) -> None:
    cfg, g = setup

    def attack(u):
        rd = u.to_recorddict()
        rd["metrics"]["loss/total"] = math.nan
        return [rd]

    _refused(cfg, g, attack, "not a finite number")


def test_unnormalised_saliency_is_refused_and_a_one_hot_one_is_bounded(setup) -> None:
    cfg, g = setup
    n = len(cfg.data.organ_set())

    def huge(u):
        u.saliency = torch.tensor([1e3] + [0.0] * (n - 1), dtype=torch.float64)
        return [u.to_recorddict()]

    _refused(cfg, g, huge, "saliency outside")

    def one_hot(u):  # within bounds: counted, but normalised and weighted like any site
        u.saliency = torch.tensor([float(n)] + [0.0] * (n - 1), dtype=torch.float64)
        return [u.to_recorddict()]

    strategy, report, honest = _round(cfg, g, one_hot)
    assert "evil" in report.site_metrics
    share = 6 / (6 + 6 + 7 + 8)  # its subject share of organ 0
    without = aggregate_round(g, honest, cfg, 1)[1].saliency
    # Organ 0's global share rises by at most what one site of that weight can add.
    assert float(strategy.global_saliency[0]) < float(without[0]) + share
    assert float(strategy.global_saliency[0]) < 0.5


def test_absurd_steps_are_refused(setup) -> None:
    cfg, g = setup

    def attack(u):
        u.steps = 10 ** 6
        return [u.to_recorddict()]

    _refused(cfg, g, attack, "optimiser steps")


def test_absurd_subject_count_is_refused_and_a_large_one_capped(setup) -> None:
    cfg, g = setup

    def absurd(u):
        u.num_examples = 10 ** 6
        u.organ_subjects = torch.full_like(u.organ_subjects, 10.0 ** 6)
        return [u.to_recorddict()]

    _refused(cfg, g, absurd, "max_site_subjects")
    # Within max_site_subjects but far above the others: weighs subject_cap x the median.
    cfg2 = _cfg(["federation.site_subjects={evil: 100}"])
    _refused(cfg2, g, lambda u: [_with_subjects(u, 101)], "federation.site_subjects.evil = 100")
    strategy, report, honest = _round(cfg, g, lambda u: [_with_subjects(u, 5000)], n_attacker=5000)
    assert report.influence["evil"]["subject_scale"] == pytest.approx(3 * 7 / 5000)
    key = "student.encoder.norm.weight"
    # Its share of the shared mean: 21 / (21 + 6 + 7 + 8) = 0.5, not 5000 / 5021.
    evil_state = fake_site_update(cfg, g, "evil", 5000, seed=9, scale=0.05).state
    mean_h = (6 * honest[0].state[key] + 7 * honest[1].state[key] + 8 * honest[2].state[key]) / 21
    expected = 0.5 * evil_state[key] + 0.5 * mean_h
    assert torch.allclose(strategy.global_state[key], expected, atol=1e-5)


def _with_subjects(u, n: int):
    u.num_examples = n
    u.organ_subjects = torch.full_like(u.organ_subjects, float(n))
    return u.to_recorddict()


def test_oversized_array_is_refused_before_decoding(setup) -> None:
    cfg, g = setup

    def attack(u):
        rd = u.to_recorddict()
        key = "student.encoder.norm.weight"
        rd["arrays"][key] = state_to_arrayrecord({key: torch.zeros(4096, 1024)})[key]
        return [rd]

    _refused(cfg, g, attack, "has shape (4096, 1024)")


def test_unknown_key_is_refused(setup) -> None:
    cfg, g = setup

    def attack(u):
        rd = u.to_recorddict()
        rd["arrays"]["student.backdoor"] = state_to_arrayrecord({"x": torch.zeros(3)})["x"]
        return [rd]

    _refused(cfg, g, attack, "unknown array 'student.backdoor'")


@pytest.mark.parametrize("name", ["x/../y", "abc\n", "../../etc", ""])
def test_path_like_site_names_are_refused(setup, name) -> None:
    cfg, g = setup

    def attack(u):
        rd = u.to_recorddict()
        rd["site"]["site-name"] = name
        return [rd]

    _refused(cfg, g, attack, "not a valid site name")


def test_scaled_update_is_clipped_to_the_norm_cap(setup) -> None:
    cfg, g = setup

    def attack(u):
        u.state = {k: g[k] + 1000 * (t - g[k]) if t.is_floating_point() else t for k, t in u.state.items()}
        return [u.to_recorddict()]

    strategy, report, honest = _round(cfg, g, attack)
    norms = sorted(delta_norm(h.state, g, [k for k in g if g[k].is_floating_point() and "gate_mass_acc" not in k])
                   for h in honest)
    scale = report.influence["evil"]["norm_scale"]
    assert scale < 0.01 and all(report.influence[s]["norm_scale"] == 1.0 for s in HONEST)
    # The global model moved by at most its share times cap x the (lower) median norm, plus the honest move.
    honest_only, _ = aggregate_round(g, honest, cfg, 1)
    shared = [k for k in g if k.startswith("student.encoder.blocks.0.attn")]
    moved = delta_norm(strategy.global_state, honest_only, shared)
    assert moved < 5 * norms[1]


def test_sign_flipped_update_is_bounded_and_the_median_ignores_it() -> None:
    cfg = _cfg(["federation.robust=median"])
    g = global_model_state(cfg)

    def attack(u):
        u.state = {k: g[k] - 20 * (t - g[k]) if t.is_floating_point() else t for k, t in u.state.items()}
        return [u.to_recorddict()]

    strategy, report, honest = _round(cfg, g, attack)
    key = "student.encoder.blocks.0.attn.qkv.weight"
    stack = torch.stack([h.state[key] for h in honest])
    lo, hi = stack.min(0).values, stack.max(0).values
    # The coordinate-wise median of 4 values with one outlier lies within the honest range.
    assert bool(((strategy.global_state[key] >= lo - 1e-6) & (strategy.global_state[key] <= hi + 1e-6)).all())


def test_a_site_claiming_every_organ_moves_organ_tokenizers_only_by_its_share(setup) -> None:
    cfg, g = setup
    key = "student.encoder.tokenizer.organs.pancreas.organ_embed"
    sent = {}

    def attack(u):
        u.organ_subjects = torch.full_like(u.organ_subjects, float(u.num_examples))  # "every organ"
        u.state[key] = g[key] + 0.05 * torch.ones_like(g[key])
        sent["state"] = u.state[key]
        return [u.to_recorddict()]

    strategy, report, honest = _round(cfg, g, attack)
    assert "evil" in report.site_metrics
    # Bounded: organ_subjects <= num-examples (decode), itself capped, so its weight in the
    # organ's mean is at most its subject share s = 6 / 27: the move is exactly s x its offset.
    honest_only, _ = aggregate_round(g, honest, cfg, 1)
    s_evil = 6 / (6 + 6 + 7 + 8)
    torch.testing.assert_close(strategy.global_state[key] - honest_only[key],
                               s_evil * (sent["state"] - honest_only[key]), atol=1e-6, rtol=1e-5)


def test_site_that_hangs_is_a_failure_and_the_round_goes_on(setup) -> None:
    cfg, g = setup
    strategy, report, honest = _round(cfg, g, lambda u: [])  # no reply within the timeout
    assert set(report.site_metrics) == set(HONEST) and report.failures == {"evil": 1}


def test_site_that_replies_twice_counts_once(setup) -> None:
    cfg, g = setup
    strategy, report, honest = _round(cfg, g, lambda u: [u.to_recorddict(), u.to_recorddict()])
    assert set(report.site_metrics) == {*HONEST, "evil"}
    assert sum("second reply" in line for line in report.dropped) == 1


def _eval_reply(node: int, site: str, n: object, loss: float) -> Message:
    REGISTERED[node] = site
    content = RecordDict({"metrics": MetricRecord({"num-examples": n, "val/loss": loss}),
                          "site": ConfigRecord({"protocol-version": 1, "site-name": site})})
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=node, message_type=MessageType.EVALUATE))


def test_evaluate_reply_poisoning_is_refused_or_bounded(setup) -> None:
    cfg, g = setup
    REGISTERED.clear()
    strategy = FedPanFM(cfg, total_steps=30)
    grid = FakeGrid([1, 2, 3, 4])
    strategy.configure_train(1, state_to_arrayrecord(g), None, grid)
    honest = [_eval_reply(i + 1, s, 2, 1.0 + i) for i, s in enumerate(HONEST)]
    missing = Message(RecordDict({"metrics": MetricRecord({"val/loss": 0.0}),
                                  "site": ConfigRecord({"protocol-version": 1, "site-name": "evil"})}),
                      reply_to=Message(RecordDict(), dst_node_id=4, message_type=MessageType.EVALUATE))
    for bad, reason in ((_eval_reply(4, "evil", 10 ** 9, 0.5), "max_site_subjects"),
                        (_eval_reply(4, "evil", 2, -1e6), "max_metric"),
                        (missing, "num-examples")):
        strategy.identify(grid)  # the node table when the replies arrive (the round loop's step)
        out = strategy.aggregate_evaluate(1, [*honest, bad])
        assert strategy.last_evaluation is not None and strategy.last_evaluation.failures == {"evil": 1}, reason
        assert out is not None and out["val/loss"] == pytest.approx(2.0)  # the honest mean
    # Accepted but large: the held-out count weighs at most subject_cap x the median.
    out = strategy.aggregate_evaluate(1, [*honest, _eval_reply(4, "evil", 1000, -1e4)])
    assert out is not None and out["val/loss"] == pytest.approx((2 * 1 + 2 * 2 + 2 * 3 + 6 * -1e4) / 12)

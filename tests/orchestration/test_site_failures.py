"""Site failures at the server: a raising site (error reply), a hanging or vanished site (no
reply within the timeout), retries, and the stop with a clear message; plus the fault hook."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from conftest import fake_site_update, global_model_state, tiny_config
from flwr.app import Error, Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.supercore.task_identity import TaskIdentity

from fedpanfm.federation.aggregate import aggregate_round
from fedpanfm.federation.tensor_codec import state_to_arrayrecord
from orchestration.strategy import FedPanFM, RoundFailed, RoundReport
from sites.faults import InjectedFault, apply_fault, parse_faults


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


Behaviour = Callable[[int], RecordDict | Error | None]  # attempt -> reply content, None = no reply


class ScriptedGrid:
    """A Grid whose nodes answer by script: per node, what it replies on each attempt; ``names``:
    node -> the site its key was registered under (its authenticated identity)."""

    def __init__(self, script: dict[int, Behaviour], names: dict[int, str] | None = None) -> None:
        self.script = script
        self.names = names or {}
        self.calls: list[list[int]] = []

    def get_node_ids(self) -> list[int]:
        return sorted(self.script)

    def get_nodes(self) -> list[NodeInfo]:
        return [NodeInfo(node_id=n, name=self.names.get(n, "")) for n in sorted(self.script)]

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.calls.append(sorted(m.metadata.dst_node_id for m in messages))
        attempt = len(self.calls) - 1
        out = []
        for m in messages:
            content = self.script[m.metadata.dst_node_id](attempt)
            if content is not None:
                out.append(Message(content, reply_to=m))
        return out


def run_round(cfg, g, script: dict[int, Behaviour],
              names: dict[int, str] | None = None) -> tuple[FedPanFM, ScriptedGrid, list[RoundReport]]:
    reports: list[RoundReport] = []
    strategy = FedPanFM(cfg, total_steps=30, on_round=reports.append)
    grid = ScriptedGrid(script, names if names is not None else {1: "a", 2: "b"})
    # The training step of the round loop (FedPanFM.start): send, check, re-send; then aggregate.
    msgs = list(strategy.configure_train(1, state_to_arrayrecord(g), None, grid))
    strategy.aggregate_train(1, strategy.train_replies(1, msgs, grid, cfg.federation.round_timeout_s))
    return strategy, grid, reports


def good(cfg, g, name: str, n: int, seed: int) -> Behaviour:
    rd = fake_site_update(cfg, g, name, n, seed=seed).to_recorddict()
    return lambda attempt: rd


def raising(attempt: int) -> Error:
    return Error(code=0, reason="site a: injected failure")


def silent(attempt: int) -> None:
    return None  # hung past the timeout, or vanished: Flower hands back no reply


@pytest.mark.parametrize("failure", [raising, silent], ids=["raise", "hang_or_vanish"])
def test_round_completes_with_the_remaining_sites(failure) -> None:
    cfg = tiny_config(["federation.min_sites=2", "federation.retries=0"])
    g = global_model_state(cfg)
    strategy, grid, (report,) = run_round(cfg, g, {1: good(cfg, g, "a", 4, 1), 2: good(cfg, g, "b", 5, 2), 3: failure})
    assert set(report.site_metrics) == {"a", "b"} and report.failures == {"node_3": 1} and grid.calls == [[1, 2, 3]]
    expected, _ = aggregate_round(g, [fake_site_update(cfg, g, "a", 4, seed=1), fake_site_update(cfg, g, "b", 5, seed=2)], cfg, 1)
    assert all(torch.equal(strategy.global_state[k], expected[k]) for k in expected)


def test_too_few_sites_are_retried_and_the_failed_site_named() -> None:
    cfg = tiny_config(["federation.min_sites=2", "federation.retries=2"])
    g = global_model_state(cfg)
    late = fake_site_update(cfg, g, "b", 5, seed=2).to_recorddict()
    # Site b fails twice (first a crash, then silence), answers on the third attempt.
    script = {1: good(cfg, g, "a", 4, 1), 2: lambda k: [Error(code=0, reason="boom"), None, late][k]}
    strategy, grid, (report,) = run_round(cfg, g, script)
    assert grid.calls == [[1, 2], [2], [2]]  # re-sent only to the failed site
    assert report.attempts == 3 and set(report.site_metrics) == {"a", "b"}
    # Node 2 is registered as site b: its failures count under that name from the first one on
    # (identity from registration, not from a reply it may never send).
    assert report.failures == {"b": 2}
    assert strategy.site_of(2) == "b"


def test_run_stops_with_a_clear_message_when_retries_run_out() -> None:
    cfg = tiny_config(["federation.min_sites=2", "federation.retries=1"])
    g = global_model_state(cfg)
    with pytest.raises(RoundFailed, match=r"round 1: 1 usable site updates after 2 attempt\(s\).*min_sites = 2.*failed: b\)"):
        run_round(cfg, g, {1: good(cfg, g, "a", 4, 1), 2: raising})


def test_fault_spec_parsing_and_raise() -> None:
    assert [(f.site, f.kind, f.round, f.seconds) for f in parse_faults("s1:raise:round2, s2:hang:round1:0.01")] == [
        ("s1", "raise", 2, 3600.0), ("s2", "hang", 1, 0.01)]
    with pytest.raises(ValueError, match="'s1:explode:round2'"):
        parse_faults("s1:explode:round2")
    os.environ["FEDPANFM_FAULT"] = "s1:raise:round2"
    try:
        apply_fault("s1", 1)  # another round: nothing
        apply_fault("s2", 2)  # another site: nothing
        with pytest.raises(InjectedFault, match="site s1: injected failure in round 2"):
            apply_fault("s1", 2)
    finally:
        del os.environ["FEDPANFM_FAULT"]


def test_vanish_fault_ends_the_site_process() -> None:
    code = "from sites.faults import apply_fault; apply_fault('s1', 3); print('still here')"
    env = {**os.environ, "FEDPANFM_FAULT": "s1:vanish:round3"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 17 and "still here" not in done.stdout

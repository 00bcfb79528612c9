"""``FedPanFM``: Flower's FedAvg taught organ-, expert- and teacher-aware aggregation.

Flower's FedAvg averages every array over every reply by ``num-examples``. Our model has
parameters that only some sites train (organ tokenizers, experts a site never routed to), a
director that is no average at all (group EMA), and a teacher with its own policy, so the
strategy keeps FedAvg's node sampling and evaluation and replaces the training round:

- ``configure_train`` sends a :class:`~fedpanfm.federation.message.TrainInstruction` (global
  weights, round, schedule position, global organ saliency, teacher policy);
  under ``federation.transfer_dtype: bf16`` the weights travel as bf16 and the sites reply bf16
  deltas, which are decoded against the fp32 master ``global_state`` (never against the bf16
  arrays Flower hands back: those are only what was sent);
- ``aggregate_train`` decodes every reply as a :class:`~fedpanfm.federation.message.SiteUpdate`,
  drops malformed ones with one log line naming the node and the reason, and hands the rest to
  an aggregator (serial or Ray, ``orchestration.ray_aggregation``).

The server-side state between rounds (global weights, global saliency, last round) lives on the
strategy; ``on_round`` receives a :class:`RoundReport` after every aggregation so the server app
can log it (TensorBoard) without the strategy knowing about files.

Reliability (docs/reliability.md): a reply that is an error, never arrives (timeout, vanished
node) or fails :func:`~fedpanfm.federation.aggregate.check_update` counts as a failure of its
site. A round with fewer than ``min_sites`` usable updates is re-sent to the failed sites up to
``federation.retries`` times; then :class:`RoundFailed` stops the run (the previous round's
checkpoint is the resume point). ``round_offset`` lets a resumed run continue its round numbers
while Flower's ``Strategy.start`` counts from 1.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore import log
from torch import Tensor

from fedpanfm.config import ExperimentConfig
from fedpanfm.federation.aggregate import check_update
from fedpanfm.federation.message import (
    BF16_STYPE,
    SITE_CONFIG,
    MessageError,
    SiteUpdate,
    TrainInstruction,
    arrayrecord_to_state,
    state_to_arrayrecord,
)
from fedpanfm.spans import SpanTimer

from orchestration.ray_aggregation import Aggregator, SerialAggregator


@dataclass
class RoundReport:
    """One closed training round, for the server app's logging.

    Args:
        server_round: the round, from 1.
        metrics: global metrics (saliency/<organ>, expert_usage/..., director_divergence/...,
            bytes/received, sites, subjects, train/<metric> subject-weighted means).
        site_metrics: site name -> that site's training metrics plus "subjects" and "steps".
        dropped: one line per dropped reply (node, site if known, reason).
        seconds: wall time of the aggregation.
        failures: site (or ``node_<id>`` before its name is known) -> failures this round
            (error replies, missing replies, rejected updates; every attempt counts).
        attempts: how many times the round was sent (1 + retries used).
    """

    server_round: int
    metrics: dict[str, float]
    site_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    failures: dict[str, int] = field(default_factory=dict)
    attempts: int = 1


class RoundFailed(RuntimeError):
    """Fewer than ``federation.min_sites`` usable updates after every retry; the run stops."""


class FedPanFM(FedAvg):
    """Organ-, expert- and teacher-aware federated averaging.

    Args:
        cfg: the experiment config (federation section: rounds, min_sites, fraction_train,
            teacher policy; organ vocabulary; DEX momenta).
        total_steps: optimiser steps planned over the whole run (every round's local epochs);
            round r starts the sites' schedules at step (r - 1) * total_steps // rounds.
        aggregator: runs the aggregation (default: serial in this process).
        on_round: called with a :class:`RoundReport` after each aggregated round.
        **fedavg_kwargs: passed to FedAvg (e.g. fraction_evaluate, min_evaluate_nodes).
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        total_steps: int,
        aggregator: Aggregator | None = None,
        on_round: Callable[[RoundReport], None] | None = None,
        **fedavg_kwargs: Any,
    ) -> None:
        fed = cfg.federation
        kwargs: dict[str, Any] = dict(
            fraction_train=fed.fraction_train,
            min_train_nodes=fed.min_sites,
            min_evaluate_nodes=fed.min_sites,
            min_available_nodes=fed.min_sites,
        )
        kwargs.update(fedavg_kwargs)
        super().__init__(**kwargs)
        if total_steps < 1:
            raise ValueError(f"FedPanFM: total_steps = {total_steps} must be >= 1")
        self.cfg = cfg
        self.organs = cfg.data.organ_set()
        self.total_steps = total_steps
        self.aggregator: Aggregator = aggregator or SerialAggregator()
        self.on_round = on_round
        self.global_state: dict[str, Tensor] | None = None
        n = len(self.organs)
        self.global_saliency: Tensor = torch.full((n,), 1.0 / n, dtype=torch.float64)
        self.server_round = 0
        self.last_report: RoundReport | None = None
        self.round_offset = 0
        #: node id -> site name, learnt from replies (a failed reply names only its node).
        self.node_sites: dict[int, str] = {}
        self._sent: tuple[RecordDict, list[int]] | None = None
        self._grid: Grid | None = None
        if fed.dp.enabled and fed.teacher_policy == "aggregate":
            raise ValueError("FedPanFM: federation.dp needs teacher_policy server_ema or local "
                             "(under 'aggregate' the sites' teachers would be averaged un-noised)")
        if fed.dp.enabled and fed.robust != "mean":
            raise ValueError(f"FedPanFM: federation.dp is calibrated for the weighted mean; "
                             f"federation.robust = {fed.robust!r} is not supported with it")

    def resume_from(self, global_state: dict[str, Tensor], saliency: Tensor, completed_round: int,
                    node_sites: dict[int, str] | None = None) -> None:
        """Continue after ``completed_round``: Flower's round r becomes round r + completed_round.

        Args:
            global_state: the global weights after ``completed_round`` (teacher included).
            saliency: the global organ saliency after it.
            completed_round: the last round whose checkpoint is complete.
            node_sites: node id -> site name, if known.
        """
        self.global_state = dict(global_state)
        self.global_saliency = saliency.to(torch.float64).clone()
        self.server_round = completed_round
        self.round_offset = completed_round
        self.node_sites.update(node_sites or {})

    def summary(self) -> None:
        super().summary()
        fed = self.cfg.federation
        log(INFO, "\t└──> FedPanFM: teacher policy %s, %d rounds, %d steps planned, aggregator %s",
            fed.teacher_policy, fed.rounds, self.total_steps, type(self.aggregator).__name__)

    def start_step(self, server_round: int) -> int:
        """The global optimiser step at which ``server_round`` starts (rounds split evenly)."""
        return (server_round - 1) * self.total_steps // self.cfg.federation.rounds

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        return self._configure_train(server_round, arrays, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return super().aggregate_evaluate(server_round + self.round_offset, replies)

    def _configure_train(self, server_round: int, arrays: ArrayRecord, grid: Grid) -> Iterable[Message]:
        """Sample sites and send each the round's :class:`TrainInstruction`.

        Args:
            server_round: the round about to run, from 1.
            arrays: the current global weights (Flower hands back what ``aggregate_train``
                returned; round 1: the initial weights). Under ``transfer_dtype: bf16`` fp32
                arrays (round 1, a resumed run) are replaced by the bf16 encoding of the master.
            config: Flower's train config; unused (everything a site needs is in the
                instruction's "fedpanfm" record).
            grid: the Grid to sample nodes from.
        """
        if self.fraction_train == 0.0:
            return []
        if server_round > self.cfg.federation.rounds:
            raise ValueError(f"FedPanFM: round {server_round} beyond federation.rounds = {self.cfg.federation.rounds}")
        if self.global_state is None:
            self.global_state = arrayrecord_to_state(arrays, "initial global arrays")
        if self.cfg.federation.transfer_dtype == "bf16" and not _all_floats_bf16(arrays):
            # Round 1's initial arrays and a resumed run's arrive fp32: the downlink is bf16 too.
            # Encoded from the fp32 master, which stays the server's copy (never read back).
            arrays = state_to_arrayrecord(self.global_state, "bf16")
        # Node sampling draws from Python's random: seeded by (seed, round) so a resumed run
        # samples the rounds it replays as the uninterrupted run did.
        random.seed(self.cfg.seed * 1_000_003 + server_round)
        num_nodes = int(len(list(grid.get_node_ids())) * self.fraction_train)
        node_ids, all_nodes = sample_nodes(grid, self.min_available_nodes, max(num_nodes, self.min_train_nodes))
        log(INFO, "configure_train: round %d, sampled %d sites (out of %d)", server_round, len(node_ids), len(all_nodes))
        instruction = TrainInstruction(
            arrays=arrays,
            server_round=server_round,
            num_rounds=self.cfg.federation.rounds,
            start_step=self.start_step(server_round),
            total_steps=self.total_steps,
            global_saliency=self.global_saliency.tolist(),
            organ_names=list(self.organs.names),
            teacher_policy=self.cfg.federation.teacher_policy,
        )
        content = instruction.to_recorddict()
        self._sent, self._grid = (content, list(node_ids)), grid
        return self._construct_messages(content, node_ids, MessageType.TRAIN)

    def site_of(self, node_id: int) -> str:
        """The site a node serves, as far as its replies told us (``node_<id>`` otherwise)."""
        return self.node_sites.get(int(node_id), f"node_{node_id}")

    def decode_replies(self, replies: Iterable[Message]) -> tuple[list[SiteUpdate], list[str]]:
        """Checked updates, and one line per dropped reply (error replies and malformed ones)."""
        if self.global_state is None:
            raise RuntimeError("FedPanFM: aggregate_train before configure_train (no global state)")
        updates: list[SiteUpdate] = []
        dropped: list[str] = []
        for msg in replies:
            node = f"node {msg.metadata.src_node_id}"
            if msg.has_content() and SITE_CONFIG in msg.content:
                name = msg.content[SITE_CONFIG].get("site-name") if isinstance(msg.content[SITE_CONFIG], ConfigRecord) else None
                if isinstance(name, str) and name:
                    self.node_sites[int(msg.metadata.src_node_id)] = name
            if msg.has_error():
                dropped.append(f"{node}: site reported an error: {msg.error.reason}")
                log(WARNING, "aggregate_train: dropping reply from %s: site reported an error: %s", node, msg.error.reason)
                continue
            try:
                # bf16 deltas are relative to what the site received, round(master); adding them
                # to the exact fp32 master keeps the master's own precision.
                update = SiteUpdate.from_recorddict(msg.content, self.organs.names, sender=node,
                                                    reference=self.global_state)
                check_update(update, self.global_state, self.cfg)
                if any(u.site == update.site for u in updates):
                    raise MessageError(f"{node} (site {update.site}): a second reply for the same site this round")
            except MessageError as exc:
                dropped.append(exc.reason)
                log(WARNING, "aggregate_train: dropping reply: %s", exc.reason)
                continue
            updates.append(update)
            # The Ray aggregator puts the arrays into its object store while the rest decode.
            self.aggregator.receive(update, len(self._sent[1]) if self._sent else 1)
        return updates, dropped

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode, check and aggregate the sites' replies.

        Returns (None, None) when no reply survives the checks: Flower then keeps the previous
        global weights.
        """
        server_round += self.round_offset
        spans = SpanTimer()
        updates, dropped, failures, attempts = self._collect(server_round, list(replies))
        spans.mark("decode")
        log(INFO, "aggregate_train: round %d, %d site updates, %d dropped", server_round, len(updates), len(dropped))
        if len(updates) < self.min_train_nodes:
            raise RoundFailed(
                f"round {server_round}: {len(updates)} usable site updates after {attempts} attempt(s), fewer than "
                f"federation.min_sites = {self.min_train_nodes} (failed: {', '.join(sorted(failures)) or 'none'}); "
                f"the run stops; round {server_round - 1} is the last complete round (resume from its checkpoint)")
        assert self.global_state is not None
        state, outcome = self.aggregator.aggregate(self.global_state, updates, self.cfg, server_round, self.global_saliency)
        spans.mark("aggregate")
        self.global_state = state
        self.global_saliency = outcome.saliency
        self.server_round = server_round
        report = RoundReport(
            server_round=server_round,
            metrics=dict(outcome.metrics),
            site_metrics={
                u.site: {**u.metrics, "subjects": float(u.num_examples), "steps": float(u.steps)} for u in updates
            },
            dropped=dropped,
            seconds=spans.elapsed(),
            failures=failures,
            attempts=attempts,
        )
        report.metrics["seconds/aggregate"] = report.seconds
        self.last_report = report
        if self.on_round is not None:
            self.on_round(report)
        spans.mark("report")
        # What the next round's sites receive (bf16 under transfer_dtype bf16); the fp32 master
        # stays in self.global_state and is what the server aggregates into and checkpoints.
        arrays = state_to_arrayrecord(state, self.cfg.federation.transfer_dtype)
        spans.mark("encode")
        # Where the server's part of the round goes (docs/performance.md, item 4); seconds.
        report.metrics.update(spans.tagged("time/server/"))
        return arrays, MetricRecord(report.metrics)


    def _collect(self, server_round: int, replies: list[Message]) -> tuple[list[SiteUpdate], list[str], dict[str, int], int]:
        """Usable updates of the round, re-sending to the failed sites while fewer than
        ``min_sites`` are usable and retries are left.

        Returns:
            (updates, dropped lines, site -> failures this round, attempts made).
        """
        failures: dict[str, int] = {}
        updates: list[SiteUpdate] = []
        dropped: list[str] = []
        sent = list(self._sent[1]) if self._sent else [int(m.metadata.src_node_id) for m in replies]
        attempts = 1
        while True:
            new, lines = self.decode_replies(replies)
            have = {u.site for u in updates}
            updates += [u for u in new if u.site not in have]
            dropped += lines
            good = {n for n, site in self.node_sites.items() if site in {u.site for u in updates}}
            failed = [n for n in sent if n not in good]
            replied = {int(m.metadata.src_node_id) for m in replies}
            for n in failed:
                failures[self.site_of(n)] = failures.get(self.site_of(n), 0) + 1
                if n not in replied:
                    log(WARNING, "aggregate_train: round %d: %s sent no reply within %g s (timed out or gone)",
                        server_round, self.site_of(n), self.cfg.federation.round_timeout_s)
            resend = getattr(self._grid, "send_and_receive", None)
            if len(updates) >= self.min_train_nodes or attempts > self.cfg.federation.retries or not failed \
                    or self._sent is None or resend is None:
                return updates, dropped, failures, attempts
            attempts += 1
            log(WARNING, "aggregate_train: round %d has %d usable updates (< min_sites %d); retry %d of %d to %s",
                server_round, len(updates), self.min_train_nodes, attempts - 1, self.cfg.federation.retries,
                ", ".join(self.site_of(n) for n in failed))
            messages = self._construct_messages(self._sent[0], failed, MessageType.TRAIN)
            replies = list(resend(messages, timeout=self.cfg.federation.round_timeout_s))
            sent = failed


def _all_floats_bf16(arrays: ArrayRecord) -> bool:
    """True when no floating array of ``arrays`` travels as fp32 numpy (all are ``BF16_STYPE``)."""
    return not any(a.stype != BF16_STYPE and a.dtype.startswith("float") for a in arrays.values())


__all__ = ["FedPanFM", "RoundFailed", "RoundReport"]

"""``FedPanFM``: Flower's FedAvg taught organ-, expert- and teacher-aware aggregation.

Flower's FedAvg averages every array over every reply by ``num-examples``. Our model has
parameters that only some sites train (organ tokenizers, experts a site never routed to), a
director that is no average at all (group EMA), and a teacher with its own policy, so the
strategy keeps FedAvg's node sampling and evaluation and replaces the training round:

- ``configure_train`` sends a :class:`~fedpanfm.federation.protocol.TrainInstruction` (global
  weights, round, schedule position, global organ saliency, teacher policy);
  under ``federation.transfer_dtype: bf16`` the weights travel as bf16 and the sites reply bf16
  deltas, which are decoded against the fp32 master ``global_state`` (never against the bf16
  arrays Flower hands back: those are only what was sent);
- ``aggregate_train`` decodes every reply as a :class:`~fedpanfm.federation.protocol.SiteUpdate`,
  drops malformed ones with one log line naming the node and the reason, and hands the rest to
  an aggregator (serial or Ray, ``orchestration.ray_aggregation``);
- ``aggregate_evaluate`` does the same for evaluate replies
  (:class:`~fedpanfm.federation.protocol.SiteEvaluation`, ``check_evaluation``) before the
  validation metrics are averaged (held-out counts capped like training subjects).

Identity (docs/security.md): which site a reply comes from is the node's authenticated site
(``orchestration.identity``: the registered key's name in deployment, the partition in
simulation), never the reply's ``site-name``; a reply whose claim differs is refused.

The server-side state between rounds (global weights, global saliency, last round) lives on the
strategy; ``on_round`` receives a :class:`RoundReport` after every aggregation so the server app
can log it (TensorBoard) without the strategy knowing about files.

The round loop (``start``) is Flower's, with the training step's I/O made explicit:
``configure_train`` -> :meth:`FedPanFM.train_replies` (send, check, re-send) ->
``aggregate_train`` -> ``configure_evaluate`` -> send -> ``aggregate_evaluate`` ->
``evaluate_fn``. The hooks return values and keep no Grid; only the loop talks to the sites.

Reliability (docs/reliability.md): a reply that is an error, never arrives (timeout, vanished
node) or fails :func:`~fedpanfm.federation.validation.check_update` counts as a failure of its
site. A round with fewer than ``min_sites`` usable updates is re-sent by the loop to the failed
sites up to ``federation.retries`` times; then ``aggregate_train`` raises :class:`RoundFailed`,
which stops the run (the previous round's checkpoint is the resume point). ``round_offset``
lets a resumed run continue its round numbers while the loop counts from 1.
"""

from __future__ import annotations

import io
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.serverapp.strategy.strategy_utils import log_strategy_start_info
from flwr.supercore import log
from torch import Tensor

from fedpanfm.config import ExperimentConfig
from fedpanfm.federation.deltas import delta_norm
from fedpanfm.federation.influence import lower_median, norm_keys
from fedpanfm.federation.planning import RoundPlan
from fedpanfm.federation.protocol import SiteEvaluation, SiteUpdate, TrainInstruction
from fedpanfm.federation.tensor_codec import (
    BF16_STYPE,
    MessageError,
    arrayrecord_to_state,
    state_to_arrayrecord,
)
from fedpanfm.federation.validation import check_evaluation, check_update
from fedpanfm.spans import SpanTimer
from orchestration.identity import node_sites
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
        failures: site (or ``node_<id>`` for a node with no authenticated site) -> failures
            this round (error replies, missing replies, rejected updates; every attempt counts).
        attempts: how many times the round was sent (1 + retries used).
        influence: site -> how far the round's caps scaled its subjects and update
            (``RoundOutcome.influence``; empty under DP).
        update_norms: site -> the L2 norm of (its update - the round's global weights) per
            tensor (``norm_keys``), before any cap: the sites' TensorBoard histograms.
    """

    server_round: int
    metrics: dict[str, float]
    site_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    failures: dict[str, int] = field(default_factory=dict)
    attempts: int = 1
    influence: dict[str, dict[str, float]] = field(default_factory=dict)
    update_norms: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class EvaluationReport:
    """One round's evaluate replies, checked, for the server app's logging and checkpoint choice.

    Args:
        server_round: the round, from 1.
        evaluations: authenticated site -> its checked evaluate reply.
        failures: site (or ``node_<id>``) -> evaluate replies dropped this round.
        metrics: ``val/*`` means over the sites (:func:`evaluation_means`); empty without replies.
    """

    server_round: int
    evaluations: dict[str, SiteEvaluation] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainReplies:
    """A training round's checked replies over all its attempts: what the round loop hands to
    ``aggregate_train``.

    Args:
        updates: the usable updates, at most one per site.
        dropped: one line per dropped reply (node, site if known, reason).
        failures: site (or ``node_<id>``) -> failures this round (every attempt counts).
        attempts: how many times the round was sent (1 + retries used).
        decode_s: seconds spent decoding and checking replies (not waiting for them).
    """

    updates: list[SiteUpdate] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    attempts: int = 1
    decode_s: float = 0.0


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
        on_evaluate: called with an :class:`EvaluationReport` after each round's evaluation.
        **fedavg_kwargs: passed to FedAvg (e.g. fraction_evaluate, min_evaluate_nodes).
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        total_steps: int,
        aggregator: Aggregator | None = None,
        on_round: Callable[[RoundReport], None] | None = None,
        on_evaluate: Callable[[EvaluationReport], None] | None = None,
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
        self.on_evaluate = on_evaluate
        self.global_state: dict[str, Tensor] | None = None
        n = len(self.organs)
        self.global_saliency: Tensor = torch.full((n,), 1.0 / n, dtype=torch.float64)
        self.server_round = 0
        self.last_report: RoundReport | None = None
        self.round_offset = 0
        #: node id -> authenticated site name (orchestration/identity.py), never from a reply.
        self.node_sites: dict[int, str] = {}
        #: The last round's checked evaluate replies, failures and means.
        self.last_evaluation: EvaluationReport | None = None
        self._plan: RoundPlan | None = None
        #: The nodes ``configure_train`` sampled this round (whose silence counts as failure).
        self._sampled: list[int] = []
        if fed.dp.enabled and fed.teacher_policy == "aggregate":
            raise ValueError("FedPanFM: federation.dp needs teacher_policy server_ema or local "
                             "(under 'aggregate' the sites' teachers would be averaged un-noised)")
        if fed.dp.enabled and fed.robust != "mean":
            raise ValueError(f"FedPanFM: federation.dp is calibrated for the weighted mean; "
                             f"federation.robust = {fed.robust!r} is not supported with it")

    def resume_from(self, global_state: dict[str, Tensor], saliency: Tensor, completed_round: int) -> None:
        """Continue after ``completed_round``: Flower's round r becomes round r + completed_round.

        Args:
            global_state: the global weights after ``completed_round`` (teacher included).
            saliency: the global organ saliency after it.
            completed_round: the last round whose checkpoint is complete.
        """
        self.global_state = dict(global_state)
        self.global_saliency = saliency.to(torch.float64).clone()
        self.server_round = completed_round
        self.round_offset = completed_round

    def identify(self, grid: Grid) -> None:
        """Refresh node id -> site from the runtime (orchestration/identity.py)."""
        self.node_sites.update(node_sites(grid, self.cfg))

    def summary(self) -> None:
        super().summary()
        fed = self.cfg.federation
        log(INFO, "\t└──> FedPanFM: teacher policy %s, %d rounds, %d steps planned, aggregator %s",
            fed.teacher_policy, fed.rounds, self.total_steps, type(self.aggregator).__name__)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Flower's round loop (``Strategy.start``, same arguments and result) with the training
        step's retries in the loop (:meth:`train_replies`) instead of inside a hook."""
        log(INFO, "Starting %s strategy:", type(self).__name__)
        log_strategy_start_info(num_rounds, initial_arrays, train_config, evaluate_config)
        self.summary()
        log(INFO, "")
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result = Result()
        t_start = time.time()
        if evaluate_fn:
            res = evaluate_fn(0, initial_arrays)
            log(INFO, "Initial global evaluation results: %s", res)
            if res is not None:
                result.evaluate_metrics_serverapp[0] = res
        arrays = initial_arrays
        for current_round in range(1, num_rounds + 1):
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", current_round, num_rounds)
            messages = list(self.configure_train(current_round, arrays, train_config, grid))
            agg_arrays, train_metrics = self.aggregate_train(
                current_round, self.train_replies(current_round, messages, grid, timeout))
            if agg_arrays is not None:
                result.arrays = arrays = agg_arrays
            if train_metrics is not None:
                log(INFO, "\t└──> Aggregated MetricRecord: %s", train_metrics)
                result.train_metrics_clientapp[current_round] = train_metrics
            replies = list(grid.send_and_receive(
                messages=self.configure_evaluate(current_round, arrays, evaluate_config, grid), timeout=timeout))
            self.identify(grid)  # the runtime's node table now (a node may have registered since)
            eval_metrics = self.aggregate_evaluate(current_round, replies)
            if eval_metrics is not None:
                log(INFO, "\t└──> Aggregated MetricRecord: %s", eval_metrics)
                result.evaluate_metrics_clientapp[current_round] = eval_metrics
            if evaluate_fn:
                log(INFO, "Global evaluation")
                res = evaluate_fn(current_round, arrays)
                log(INFO, "\t└──> MetricRecord: %s", res)
                if res is not None:
                    result.evaluate_metrics_serverapp[current_round] = res
        log(INFO, "")
        log(INFO, "Strategy execution finished in %.2fs", time.time() - t_start)
        log(INFO, "")
        log(INFO, "Final results:")
        log(INFO, "")
        for line in io.StringIO(str(result)):
            log(INFO, "\t%s", line.strip("\n"))
        log(INFO, "")
        return result

    def train_replies(self, server_round: int, messages: list[Message], grid: Grid, timeout: float) -> TrainReplies:
        """The training step's I/O: send the round's instructions, check the replies, and
        re-send to the failed sites while fewer than ``min_sites`` updates are usable and
        ``federation.retries`` allow.

        Args:
            server_round: Flower's round (from 1; ``round_offset`` is added here).
            messages: what ``configure_train`` returned.
            grid: the Grid to send through.
            timeout: seconds to wait for each attempt's replies.
        """
        server_round += self.round_offset
        collected = TrainReplies()
        sent = [int(m.metadata.dst_node_id) for m in messages]
        while True:
            replies = list(grid.send_and_receive(messages, timeout=timeout))
            self.identify(grid)  # the runtime's node table now (a node may have registered since)
            failed = self.check_attempt(server_round, replies, sent, collected)
            if len(collected.updates) >= self.min_train_nodes or collected.attempts > self.cfg.federation.retries \
                    or not failed:
                return collected
            collected.attempts += 1
            log(WARNING, "round %d has %d usable updates (< min_sites %d); retry %d of %d to %s",
                server_round, len(collected.updates), self.min_train_nodes, collected.attempts - 1,
                self.cfg.federation.retries, ", ".join(self.site_of(n) for n in failed))
            messages = list(self._construct_messages(messages[0].content, failed, MessageType.TRAIN))
            sent = failed

    def start_step(self, server_round: int) -> int:
        """The global optimiser step at which ``server_round`` starts (rounds split evenly)."""
        return (server_round - 1) * self.total_steps // self.cfg.federation.rounds

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        return self._configure_train(server_round, arrays, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.identify(grid)
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Check every evaluate reply (identity, structure, bounds) and average the survivors'
        ``val/*`` metrics by held-out subjects, each count capped at ``subject_cap x`` the lower
        median (a site cannot buy the choice of the best checkpoint by claiming a large cohort).
        A failing reply is dropped, logged, and counted as its site's failure."""
        server_round += self.round_offset
        report = EvaluationReport(server_round)
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            try:
                if msg.has_error():
                    raise MessageError(f"node {node}: site reported an error: {msg.error.reason}")
                ev = SiteEvaluation.from_recorddict(msg.content, sender=f"node {node}")
                self._check_identity(node, ev.site)
                check_evaluation(ev, self.cfg)
                if ev.site in report.evaluations:
                    raise MessageError(f"node {node} (site {ev.site}): a second evaluate reply this round")
            except MessageError as exc:
                site = self.site_of(node)
                report.failures[site] = report.failures.get(site, 0) + 1
                log(WARNING, "aggregate_evaluate: round %d: dropping reply from %s: %s", server_round, site, exc.reason)
                continue
            report.evaluations[ev.site] = ev
        means = evaluation_means(report.evaluations.values(), self.cfg.federation.subject_cap)
        report.metrics = {k: float(v) for k, v in means.items() if isinstance(v, (int, float))} if means is not None else {}
        self.last_evaluation = report
        if self.on_evaluate is not None:
            self.on_evaluate(report)
        return means

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
        # Node sampling draws from a generator of its own, seeded by (seed, round), so a resumed
        # run samples the rounds it replays as the uninterrupted run did (and no global RNG moves).
        rng = random.Random(self.cfg.seed * 1_000_003 + server_round)
        num_nodes = int(len(list(grid.get_node_ids())) * self.fraction_train)
        node_ids, all_nodes = sample_nodes(grid, self.min_available_nodes, max(num_nodes, self.min_train_nodes), rng)
        log(INFO, "configure_train: round %d, sampled %d sites (out of %d)", server_round, len(node_ids), len(all_nodes))
        self.identify(grid)
        # Fixed before any reply: the DP mean's denominator and the planned steps per round.
        self._plan = RoundPlan(sampled=len(node_ids), steps=self.total_steps / self.cfg.federation.rounds)
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
        self._sampled = list(node_ids)
        return self._construct_messages(instruction.to_recorddict(), node_ids, MessageType.TRAIN)

    def site_of(self, node_id: int) -> str:
        """The site a node is authenticated as (``node_<id>`` for a node without one)."""
        return self.node_sites.get(int(node_id), f"node_{node_id}")

    def _check_identity(self, node: int, claimed: str) -> None:
        """Raise :class:`MessageError` unless ``node`` is authenticated as site ``claimed``."""
        site = self.node_sites.get(node)
        if site is None:
            raise MessageError(f"node {node}: no authenticated site (not a registered node); its reply claims "
                               f"site {claimed!r}")
        if site != claimed:
            raise MessageError(f"node {node} is site {site}, but its reply claims to be site {claimed!r} "
                               "(impersonation refused)")

    def decode_replies(self, replies: Iterable[Message]) -> tuple[list[SiteUpdate], list[str]]:
        """Checked updates, and one line per dropped reply (error replies and malformed ones)."""
        if self.global_state is None:
            raise RuntimeError("FedPanFM: aggregate_train before configure_train (no global state)")
        updates: list[SiteUpdate] = []
        dropped: list[str] = []
        for msg in replies:
            node = f"node {msg.metadata.src_node_id}"
            if msg.has_error():
                dropped.append(f"{node}: site reported an error: {msg.error.reason}")
                log(WARNING, "aggregate_train: dropping reply from %s: site reported an error: %s", node, msg.error.reason)
                continue
            try:
                # bf16 deltas are relative to what the site received, round(master); adding them
                # to the exact fp32 master keeps the master's own precision.
                update = SiteUpdate.from_recorddict(msg.content, self.organs.names, sender=node,
                                                    reference=self.global_state)
                self._check_identity(int(msg.metadata.src_node_id), update.site)
                check_update(update, self.global_state, self.cfg)
                if any(u.site == update.site for u in updates):
                    raise MessageError(f"{node} (site {update.site}): a second reply for the same site this round")
            except MessageError as exc:
                dropped.append(exc.reason)
                log(WARNING, "aggregate_train: dropping reply: %s", exc.reason)
                continue
            updates.append(update)
            # The Ray aggregator puts the arrays into its object store while the rest decode.
            self.aggregator.receive(update, len(self._sampled) or 1)
        return updates, dropped

    def check_attempt(self, server_round: int, replies: list[Message], sent: list[int], collected: TrainReplies) -> list[int]:
        """Decode and check one attempt's replies into ``collected`` and count the failures of
        the nodes in ``sent`` (an error, a dropped reply, no reply); returns those nodes."""
        t0 = time.perf_counter()
        new, lines = self.decode_replies(replies)
        collected.decode_s += time.perf_counter() - t0
        have = {u.site for u in collected.updates}
        collected.updates += [u for u in new if u.site not in have]
        collected.dropped += lines
        usable = {u.site for u in collected.updates}
        good = {n for n, site in self.node_sites.items() if site in usable}
        failed = [n for n in sent if n not in good]
        replied = {int(m.metadata.src_node_id) for m in replies}
        for n in failed:
            collected.failures[self.site_of(n)] = collected.failures.get(self.site_of(n), 0) + 1
            if n not in replied:
                log(WARNING, "aggregate_train: round %d: %s sent no reply within %g s (timed out or gone)",
                    server_round, self.site_of(n), self.cfg.federation.round_timeout_s)
        return failed

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message] | TrainReplies) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the round's usable updates.

        Args:
            server_round: Flower's round (from 1).
            replies: the round loop's :class:`TrainReplies` (checked over every attempt), or
                Flower's reply messages of one attempt, which are checked here.

        Raises:
            RoundFailed: fewer than ``min_sites`` usable updates.
        """
        server_round += self.round_offset
        spans = SpanTimer()
        # Replies the round loop checked already (their decode time is added to the span below).
        earlier = replies.decode_s if isinstance(replies, TrainReplies) else 0.0
        if isinstance(replies, TrainReplies):
            collected = replies
        else:
            messages = list(replies)
            collected = TrainReplies()
            self.check_attempt(server_round, messages, self._sampled or [int(m.metadata.src_node_id) for m in messages],
                               collected)
        # In site order, not arrival order: the weighted sums are float sums, whose last bits depend
        # on the order, so the same seeded run gave different models (macro AUROC apart by 2e-4).
        updates, failures = sorted(collected.updates, key=lambda u: u.site), collected.failures
        spans.mark("decode")
        log(INFO, "aggregate_train: round %d, %d site updates, %d dropped", server_round, len(updates),
            len(collected.dropped))
        if len(updates) < self.min_train_nodes:
            raise RoundFailed(
                f"round {server_round}: {len(updates)} usable site updates after {collected.attempts} attempt(s), fewer "
                f"than federation.min_sites = {self.min_train_nodes} (failed: {', '.join(sorted(failures)) or 'none'}); "
                f"the run stops; round {server_round - 1} is the last complete round (resume from its checkpoint)")
        assert self.global_state is not None
        # Measured against the weights the sites started from, before aggregation replaces them.
        norms = {u.site: [delta_norm(u.state, self.global_state, [k]) for k in norm_keys(u) if k in self.global_state]
                 for u in updates}
        plan = self._plan or RoundPlan(sampled=len(updates), steps=self.total_steps / self.cfg.federation.rounds)
        state, outcome = self.aggregator.aggregate(self.global_state, updates, self.cfg, server_round, self.global_saliency,
                                                   plan)
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
            dropped=collected.dropped,
            seconds=spans.elapsed() + earlier,
            failures=failures,
            attempts=collected.attempts,
            influence=outcome.influence,
            update_norms=norms,
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
        report.metrics["time/server/decode_s"] += earlier
        values: dict[str, int | float | list[int] | list[float]] = {**report.metrics}
        return arrays, MetricRecord(values)


def evaluation_means(evaluations: Iterable[SiteEvaluation], subject_cap: float) -> MetricRecord | None:
    """``val/*`` means over the sites reporting each, weighted by held-out subjects capped at
    ``subject_cap x`` the lower median (0 = no cap); None without any evaluation."""
    evs = list(evaluations)
    if not evs:
        return None
    cap = subject_cap * lower_median([e.num_examples for e in evs]) if subject_cap > 0 else float("inf")
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for e in evs:
        w = min(float(e.num_examples), cap)
        for k, v in e.metrics.items():
            sums[k] = sums.get(k, 0.0) + w * v
            weights[k] = weights.get(k, 0.0) + w
    return MetricRecord({k: sums[k] / weights[k] for k in sorted(sums)})


def sample_nodes(grid: Grid, min_available_nodes: int, sample_size: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """Flower's ``strategy_utils.sample_nodes`` with a generator of our own instead of the global one:
    wait until ``max(min_available_nodes, sample_size)`` nodes are connected, then sample.

    Returns:
        (the sampled node ids, every connected node id).
    """
    needed = max(min_available_nodes, sample_size)
    while len(all_nodes := list(grid.get_node_ids())) < needed:
        log(INFO, "Waiting for nodes to connect: %d connected (minimum required: %d).", len(all_nodes), needed)
        time.sleep(1)
    return rng.sample(all_nodes, sample_size), all_nodes


def _all_floats_bf16(arrays: ArrayRecord) -> bool:
    """True when no floating array of ``arrays`` travels as fp32 numpy (all are ``BF16_STYPE``)."""
    return not any(a.stype != BF16_STYPE and a.dtype.startswith("float") for a in arrays.values())


__all__ = ["EvaluationReport", "FedPanFM", "RoundFailed", "RoundReport", "TrainReplies", "evaluation_means",
           "sample_nodes"]

"""``FedPanFM``: Flower's FedAvg taught organ-, expert- and teacher-aware aggregation.

Flower's FedAvg averages every array over every reply by ``num-examples``. Our model has
parameters that only some sites train (organ tokenizers, experts a site never routed to), a
director that is no average at all (group EMA), and a teacher with its own policy, so the
strategy keeps FedAvg's node sampling and evaluation and replaces the training round:

- ``configure_train`` sends a :class:`~fedpanfm.federation.message.TrainInstruction` (global
  weights, round, schedule position, global organ saliency, teacher policy);
- ``aggregate_train`` decodes every reply as a :class:`~fedpanfm.federation.message.SiteUpdate`,
  drops malformed ones with one log line naming the node and the reason, and hands the rest to
  an aggregator (serial or Ray, ``orchestration.ray_aggregation``).

The server-side state between rounds (global weights, global saliency, last round) lives on the
strategy; ``on_round`` receives a :class:`RoundReport` after every aggregation so the server app
can log it (TensorBoard) without the strategy knowing about files.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore import log
from torch import Tensor

from fedpanfm.config import ExperimentConfig
from fedpanfm.federation.aggregate import check_update
from fedpanfm.federation.message import MessageError, SiteUpdate, TrainInstruction, arrayrecord_to_state, state_to_arrayrecord

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
    """

    server_round: int
    metrics: dict[str, float]
    site_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    seconds: float = 0.0


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

    def summary(self) -> None:
        super().summary()
        fed = self.cfg.federation
        log(INFO, "\t└──> FedPanFM: teacher policy %s, %d rounds, %d steps planned, aggregator %s",
            fed.teacher_policy, fed.rounds, self.total_steps, type(self.aggregator).__name__)

    def start_step(self, server_round: int) -> int:
        """The global optimiser step at which ``server_round`` starts (rounds split evenly)."""
        return (server_round - 1) * self.total_steps // self.cfg.federation.rounds

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Sample sites and send each the round's :class:`TrainInstruction`.

        Args:
            server_round: the round about to run, from 1.
            arrays: the current global weights (Flower hands back what ``aggregate_train``
                returned; round 1: the initial weights).
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
        return self._construct_messages(instruction.to_recorddict(), node_ids, MessageType.TRAIN)

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
                update = SiteUpdate.from_recorddict(msg.content, self.organs.names, sender=node)
                check_update(update, self.global_state, self.cfg)
                if any(u.site == update.site for u in updates):
                    raise MessageError(f"{node} (site {update.site}): a second reply for the same site this round")
            except MessageError as exc:
                dropped.append(exc.reason)
                log(WARNING, "aggregate_train: dropping reply: %s", exc.reason)
                continue
            updates.append(update)
        return updates, dropped

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode, check and aggregate the sites' replies.

        Returns (None, None) when no reply survives the checks: Flower then keeps the previous
        global weights.
        """
        t0 = time.perf_counter()
        updates, dropped = self.decode_replies(replies)
        log(INFO, "aggregate_train: round %d, %d site updates, %d dropped", server_round, len(updates), len(dropped))
        if not updates:
            log(WARNING, "aggregate_train: round %d has no usable reply; the global model stays as it was", server_round)
            return None, None
        assert self.global_state is not None
        state, outcome = self.aggregator.aggregate(self.global_state, updates, self.cfg, server_round, self.global_saliency)
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
            seconds=time.perf_counter() - t0,
        )
        report.metrics["seconds/aggregate"] = report.seconds
        self.last_report = report
        if self.on_round is not None:
            self.on_round(report)
        return state_to_arrayrecord(state), MetricRecord(report.metrics)


__all__ = ["FedPanFM", "RoundReport"]

"""Closing a round after the group means: directors, teacher, accumulators, saliency, metrics.

What depends on the means, and so runs after them in the server process whichever way the
means ran: the directors' group EMA from the aggregated experts (``directors``), the global
teacher by the teacher policy (``teacher_policy``), the reset accumulators, the global saliency
and the round's metrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedpanfm.config import ExperimentConfig
from fedpanfm.federation.directors import State, director_divergence, director_momentum, global_usage, update_directors
from fedpanfm.federation.influence import lower_median, normalised_saliency
from fedpanfm.federation.param_groups import classify
from fedpanfm.federation.protocol import SiteUpdate
from fedpanfm.federation.saliency import aggregate_saliency
from fedpanfm.federation.teacher_policy import averaged_roles, global_teacher
from fedpanfm.federation.tensor_codec import state_nbytes


def mean_site_metrics(updates: Sequence[SiteUpdate]) -> dict[str, float]:
    """Every training metric averaged over the sites reporting it, weighted by subjects."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for u in updates:
        for k, v in u.metrics.items():
            sums[k] = sums.get(k, 0.0) + v * u.num_examples
            weights[k] = weights.get(k, 0.0) + u.num_examples
    return {k: sums[k] / weights[k] for k in sums}


@dataclass
class RoundOutcome:
    """What a round produced besides the weights.

    Args:
        saliency: (n_organs,) the new global saliency shares.
        metrics: flat name -> float (tags as TensorBoard uses them).
        influence: site -> {"subject_scale", "norm_scale"}: how far the round's caps scaled its
            subject counts and its update (1 = untouched; ``federation.influence``).
    """

    saliency: Tensor
    metrics: dict[str, float]
    influence: dict[str, dict[str, float]] = field(default_factory=dict)


def finish_round(
    means: State,
    previous: Mapping[str, Tensor],
    updates: Sequence[SiteUpdate],
    cfg: ExperimentConfig,
    server_round: int,
    previous_saliency: Tensor | None = None,
    *,
    saliency: Tensor | None = None,
    round_steps: float | None = None,
    director_usage: Tensor | None = None,
) -> tuple[State, RoundOutcome]:
    """Complete the new global state from the group means.

    Args:
        means: the output of the mean tasks (``planning.plan_means``).
        previous: the global state before the round.
        updates: the sites' checked updates.
        cfg: the experiment config.
        server_round: the round being closed, from 1.
        previous_saliency: last round's global saliency (None = uniform).
        saliency: the new global saliency (DP: already noised); None: the mean of the sites'
            normalised saliency weighted by organ subjects (``federation.saliency``).
        round_steps: the local steps a round stands for (the directors' momentum); None: the
            lower median of the sites' steps (one site cannot set it).
        director_usage: (L, E) expert weights of the directors' group EMA; None: the sites'
            summed gate mass.
    """
    policy = cfg.federation.teacher_policy
    state: State = dict(means)
    for key, t in previous.items():
        if classify(key).kind == "accumulator":
            state[key] = torch.zeros_like(t)
    usage = global_usage(updates)
    steps = round_steps if round_steps is not None else (lower_median([float(u.steps) for u in updates]) if updates else 1.0)
    m_dir = director_momentum(cfg, server_round, steps)
    update_directors(state, previous, usage if director_usage is None else director_usage, m_dir,
                     list(averaged_roles(policy)))
    state.update(global_teacher(policy, state, previous, cfg.federation.server_teacher_momentum))
    state = {k: state[k] for k in previous}  # the global key order, and proof nothing is missing

    organs = cfg.data.organ_set()
    if saliency is None:
        saliency = aggregate_saliency([normalised_saliency(u.saliency, u.organ_subjects) for u in updates],
                                      [u.organ_subjects for u in updates], previous_saliency)
    metrics: dict[str, float] = {f"saliency/{o}": float(s) for o, s in zip(organs.names, saliency)}
    for l in range(usage.shape[0]):
        total = float(usage[l].sum())
        for e in range(usage.shape[1]):
            metrics[f"expert_usage/layer{l}/e{e}"] = float(usage[l, e]) / total if total > 0 else 0.0
    div = director_divergence(state)
    for l, d in div.items():
        metrics[f"director_divergence/layer{l}"] = d
    if div:
        metrics["director_divergence/mean"] = sum(div.values()) / len(div)
        metrics["director_momentum"] = m_dir
    metrics["bytes/received"] = float(sum(state_nbytes(u.state) for u in updates))
    metrics["sites"] = float(len(updates))
    metrics["subjects"] = float(sum(u.num_examples for u in updates))
    metrics.update({f"train/{k}": v for k, v in mean_site_metrics(updates).items()})
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise ValueError(f"round {server_round}: metric {bad[0]!r} is not finite")
    return state, RoundOutcome(saliency, metrics)


__all__ = ["RoundOutcome", "finish_round", "mean_site_metrics"]

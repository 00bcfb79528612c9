"""Planning a round's aggregation: what the server fixed before the replies, and the weighted-mean
task of every parameter group (docs/federation.md).

Each group gets its per-site weights: subjects (shared), subjects holding the organ (organ
tokenizers), routed gate mass (experts). Directors and accumulators are no means (the server
derives them after the means); the teacher is averaged only when the teacher policy has the
sites send it (``teacher_policy``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedpanfm.config import ExperimentConfig
from fedpanfm.federation.means import MeanTask
from fedpanfm.federation.param_groups import group_keys
from fedpanfm.federation.protocol import SiteUpdate
from fedpanfm.federation.teacher_policy import averaged_roles


@dataclass(frozen=True)
class RoundPlan:
    """What the server fixed for a round before any reply arrived (the DP estimator needs it).

    Args:
        sampled: sites the round was sent to: ``max(int(n * fraction_train), min_sites)``, the
            fixed denominator of the private mean.
        steps: optimiser steps planned per site and round (the directors' momentum under DP).
    """

    sampled: int
    steps: float


def plan_means(global_state: Mapping[str, Tensor], updates: Sequence[SiteUpdate], cfg: ExperimentConfig) -> list[MeanTask]:
    """The weighted-mean tasks of a round (everything but directors, accumulators and, unless
    the teacher policy is "aggregate", the teacher).

    Args:
        global_state: the global state before the round (defines the keys and groups).
        updates: the sites' checked updates (``validation.check_update``).
        cfg: the experiment config (organ vocabulary, teacher policy).
    """
    organs = cfg.data.organ_set()
    subjects = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
    tasks: list[MeanTask] = []
    for group, keys in group_keys(global_state).items():
        if group.kind in ("director", "accumulator"):
            continue
        if group.role not in (*averaged_roles(cfg.federation.teacher_policy), "other"):
            continue
        if group.kind == "organ":
            o = organs.index(group.organ or "")
            weights = torch.stack([u.organ_subjects[o].to(torch.float64) for u in updates])
        elif group.kind == "expert":
            weights = torch.stack([u.gate_mass[group.layer, group.expert].to(torch.float64) for u in updates])
        else:
            weights = subjects
        robust = cfg.federation.robust if group.kind == "shared" else "mean"
        tasks.append(MeanTask(group, tuple(keys), weights, robust, cfg.federation.trim_fraction))
    return tasks


__all__ = ["RoundPlan", "plan_means"]

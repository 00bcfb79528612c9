"""DEX directors on the server: group EMA from the aggregated experts, and how far they diverge.

Our reconstruction (docs/federation.md, "Directors"): the global director of block l is updated
as in DEX, ``theta_D <- m * theta_D + (1 - m) * sum_e w_e * theta_e``, from the previous global
director and the round's aggregated experts, with ``w`` the gate mass all sites routed to each
expert (global usage) and ``m`` the per-step cosine momentum compounded over the round's local steps. The sites' own directors are not used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedpanfm.config import ExperimentConfig
from fedpanfm.federation.param_groups import ParamGroup, group_keys, module_suffix
from fedpanfm.federation.protocol import SiteUpdate
from fedpanfm.model.group_ema import group_ema
from fedpanfm.train.schedules import cosine

State = dict[str, Tensor]


def director_momentum(cfg: ExperimentConfig, server_round: int, local_steps: float = 1.0) -> float:
    """Server group-EMA momentum of a round.

    The per-step momentum follows DEX's cosine (``model.dex.gema_momentum_start`` at round 1 to
    ``gema_momentum_end`` at the last round); a round stands for ``local_steps`` optimiser steps
    of the sites, so the per-step momentum is compounded over them: ``m_round = m_step **
    local_steps``. Without this the global director would move by one step's worth per round.

    Args:
        cfg: the experiment config (``model.dex`` momenta, ``federation.rounds``).
        server_round: the round being closed, from 1.
        local_steps: mean optimiser steps the contributing sites took this round (>= 1 counts).
    """
    dex = cfg.model.dex
    m_step = cosine(dex.gema_momentum_start, dex.gema_momentum_end, server_round - 1, cfg.federation.rounds - 1)
    return float(m_step ** max(1.0, float(local_steps)))


def global_usage(updates: Sequence[SiteUpdate]) -> Tensor:
    """(L, E) float64 gate mass summed over sites (empty (0, 0) without updates)."""
    if not updates:
        return torch.zeros(0, 0, dtype=torch.float64)
    return torch.stack([u.gate_mass.to(torch.float64) for u in updates]).sum(0)


def update_directors(state: State, previous: Mapping[str, Tensor], usage: Tensor, momentum: float, roles: Sequence[str]) -> State:
    """Group EMA of every director from the (already aggregated) experts in ``state``.

    Args:
        state: the new global state; must hold the aggregated experts; directors are written here.
        previous: the global state before the round (the directors' EMA starts from it).
        usage: (L, E) global gate mass; a layer with none keeps its previous director.
        momentum: the group-EMA momentum m.
        roles: which networks' directors to update ("student", "teacher").
    """
    by_group = group_keys(previous)
    for group, keys in by_group.items():
        if group.kind != "director" or group.role not in roles:
            continue
        layer = group.layer if group.layer is not None else -1
        w = usage[layer] if 0 <= layer < usage.shape[0] else torch.zeros(0)
        if w.numel() == 0 or float(w.sum()) <= 0:
            state.update({k: previous[k] for k in keys})
            continue
        director = {module_suffix(k, group): previous[k] for k in keys}
        experts = []
        for e in range(w.numel()):
            eg = ParamGroup(group.role, "expert", layer=group.layer, expert=e)
            experts.append({module_suffix(k, eg): state[k] for k in by_group[eg]})
        new = group_ema(director, experts, w, momentum)
        state.update({k: new[module_suffix(k, group)] for k in keys})
    return state


def _norm(t: Tensor) -> Tensor:
    """Euclidean norm of a tensor, accumulated in float64."""
    return torch.linalg.vector_norm(t.flatten(), dtype=torch.float64)


def director_divergence(state: Mapping[str, Tensor], role: str = "student") -> dict[int, float]:
    """Per block: mean over experts of ||theta_D - theta_e|| / ||theta_D|| (all director
    parameters concatenated) — how far the experts have moved from their director."""
    by_group = group_keys(state)
    out: dict[int, float] = {}
    for group, keys in by_group.items():
        if group.kind != "director" or group.role != role or group.layer is None:
            continue
        # Squared norms summed key by key (float64 accumulation), instead of concatenating the
        # director and each expert into float64 copies.
        d_sq = sum(float(_norm(state[k]) ** 2) for k in keys)
        dists = []
        for eg, ekeys in by_group.items():
            if eg.kind == "expert" and eg.role == role and eg.layer == group.layer:
                sfx = {module_suffix(k, eg): k for k in ekeys}
                diff_sq = sum(float(_norm(state[k] - state[sfx[module_suffix(k, group)]]) ** 2) for k in keys)
                dists.append(math.sqrt(diff_sq) / max(math.sqrt(d_sq), 1e-12))
        if dists:
            out[group.layer] = sum(dists) / len(dists)
    return out


__all__ = ["director_divergence", "director_momentum", "global_usage", "update_directors"]

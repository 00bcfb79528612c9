"""Central differential privacy: the per-site clip, the fixed-denominator mean, the noise.

Our reconstruction (no paper fixes it; docs/security.md, "Differential privacy"):

- **What is privatised**: every floating tensor the server averages (:func:`dp_keys`: student
  weights but the directors and accumulators, the DINO / iBOT centres, the masker buffers) and
  the site's organ saliency, as ONE joint vector per site. Everything else the server sends is
  derived from the noised result only: the teacher (server EMA of the noised student), the
  directors (group EMA of the noised experts with uniform expert weights and the planned step
  count, never the sites' gate mass or steps), the reset accumulators.
- **Clip per site**: the joint delta ``site - global`` is scaled to L2 norm <= ``clip_norm``
  (``deltas.clip_delta``). Clipping happens at the server (central DP: the server is trusted).
- **Fixed denominator** (McMahan et al. 2018, "DP-FedAvg"; Flower's DP wrappers divide by the
  number of sampled sites the same way): ``new = global + sum_i w_i * clipped_delta_i / D`` with
  ``w_i`` = 1 for a site that trained the group (0 otherwise) and ``D`` = the sites SAMPLED this
  round, fixed before any reply. Adding or removing one site moves the result by at most
  ``clip_norm / D`` in L2, whatever the others sent (a data-dependent denominator, as the
  weighted mean has, moves by up to twice that and more).
- **Noise**: N(0, (noise_multiplier * clip_norm / D)^2) on every privatised element, drawn from
  a generator seeded from the operating system's CSPRNG (``secrets``) for every release: it is
  never derivable from the config, the checkpoints or the round number, and a resumed run draws
  fresh noise.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from fedpanfm.config import ExperimentConfig
from fedpanfm.federation.deltas import clip_delta
from fedpanfm.federation.directors import State
from fedpanfm.federation.influence import normalised_saliency
from fedpanfm.federation.means import RunMeans, run_means_serial
from fedpanfm.federation.outcome import RoundOutcome, finish_round
from fedpanfm.federation.param_groups import classify
from fedpanfm.federation.planning import RoundPlan, plan_means
from fedpanfm.federation.protocol import SiteUpdate

#: The joint vector's entry for a site's organ saliency (no state-dict key looks like it).
SALIENCY = "fedpanfm:saliency"


def dp_keys(state: Mapping[str, Tensor]) -> list[str]:
    """The privatised keys of a state dict: every floating tensor the server averages (all but
    the teacher, the directors and the accumulators, which it derives itself)."""
    out = []
    for k, t in state.items():
        g = classify(k)
        if t.is_floating_point() and g.role != "teacher" and g.kind not in ("director", "accumulator"):
            out.append(k)
    return out


def secure_generator() -> torch.Generator:
    """A CPU generator seeded with 63 bits from the OS CSPRNG: one per release, never stored."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def add_noise(state: Mapping[str, Tensor], keys: Iterable[str], std: float,
              generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """``state`` with N(0, std^2) added to every element of ``keys`` (new tensors; input untouched).

    Args:
        state: the aggregated state.
        keys: the keys to noise.
        std: the noise standard deviation (>= 0).
        generator: where the noise comes from; None (every real release): a fresh
            :func:`secure_generator`. Pass one only to reproduce noise in a test.
    """
    if std < 0 or not math.isfinite(std):
        raise ValueError(f"add_noise: std = {std} must be finite and >= 0")
    gen = generator if generator is not None else secure_generator()
    out = dict(state)
    for k in keys:
        t = state[k]
        noise = torch.randn(t.shape, generator=gen, dtype=torch.float64) * std
        out[k] = (t.to(torch.float64) + noise).to(t.dtype)
    return out


def fixed_denominator(weights: Tensor, denominator: int) -> tuple[Tensor, float]:
    """The weights of the fixed-denominator mean as a weighted mean with the previous global
    tensor as one more term: (per-site weights, weight of the previous tensor).

    ``global + sum_i w_i (x_i - global) / D`` = ``sum_i w_i x_i / D + (1 - sum_i w_i / D) global``
    with ``w_i`` = 1 for a site with a positive weight, 0 otherwise.

    Args:
        weights: (n_sites,) the group's ordinary weights (only their sign is used).
        denominator: D, the sites sampled this round (>= the number of replies).
    """
    w = (weights > 0).to(torch.float64)
    if denominator < w.numel() or denominator < 1:
        raise ValueError(f"fixed_denominator: {w.numel()} replies for {denominator} sampled sites")
    return w, float(denominator - w.sum())


def private_round(
    global_state: Mapping[str, Tensor],
    updates: Sequence[SiteUpdate],
    cfg: ExperimentConfig,
    server_round: int,
    plan: RoundPlan,
    previous_saliency: Tensor | None = None,
    run_means: RunMeans = run_means_serial,
) -> tuple[State, RoundOutcome]:
    """The round under central DP (fedpanfm/federation/privacy.py, docs/security.md).

    Per site, the joint delta of every privatised tensor (:func:`dp_keys`) and its saliency
    (normalised, in global-share units, organs it lacks at the previous global value) is clipped
    to ``clip_norm``; each group is the fixed-denominator mean over the ``plan.sampled`` sites
    (a site that trained the group counts once, the rest of the denominator keeps the previous
    value); Gaussian noise of std ``noise_multiplier * clip_norm / plan.sampled`` goes on every
    privatised element and the saliency, from a fresh CSPRNG-seeded generator. The teacher, the
    directors (uniform expert weights, ``plan.steps``) and the saliency shares are then derived
    from the noised values only. Adding or removing one site moves the un-noised result by at
    most ``clip_norm / plan.sampled`` (tests/federation/test_dp_mechanism.py).

    Args:
        global_state: the global state before the round.
        updates: the checked updates (at most ``plan.sampled``).
        cfg: the experiment config (``federation.dp``).
        server_round: the round being closed.
        plan: sites sampled and planned steps.
        previous_saliency: last round's global saliency shares (None = uniform).
        run_means: executes the mean tasks.
    """
    dp = cfg.federation.dp
    n_organs = len(cfg.data.organ_set())
    keys = dp_keys(global_state)
    prev_sal = (torch.full((n_organs,), 1.0 / n_organs, dtype=torch.float64) if previous_saliency is None
                else previous_saliency.to(torch.float64).flatten())
    reference = {**{k: global_state[k] for k in keys}, SALIENCY: prev_sal}
    states: list[State] = []
    sal_sum = torch.zeros(n_organs, dtype=torch.float64)
    for u in updates:
        # Global-share units: a site's normalised saliency (mean 1 over its organs) / n_organs.
        site_sal = torch.where(u.organ_subjects > 0, normalised_saliency(u.saliency, u.organ_subjects) / n_organs, prev_sal)
        joint = {**{k: u.state.get(k, global_state[k]) for k in keys}, SALIENCY: site_sal}
        clipped, _ = clip_delta(joint, reference, [*keys, SALIENCY], dp.clip_norm)
        sal_sum += clipped.pop(SALIENCY) - prev_sal
        states.append({**u.state, **clipped})
    tasks = []
    for task in plan_means(global_state, updates, cfg):
        w, w_prev = fixed_denominator(task.weights, plan.sampled)
        tasks.append(dataclasses.replace(task, weights=torch.cat([w, torch.tensor([w_prev], dtype=torch.float64)]),
                                         reducer="mean"))
    # The previous global state is one more term of every mean: it holds the denominator's rest.
    means = run_means(tasks, [*states, global_state], global_state)
    std = dp.noise_multiplier * dp.clip_norm / plan.sampled
    noised = add_noise({**means, SALIENCY: prev_sal + sal_sum / plan.sampled}, [*keys, SALIENCY], std)
    raw = noised.pop(SALIENCY).clamp_min(0.0)
    total = float(raw.sum())
    saliency = raw / total if total > 0 else torch.full((n_organs,), 1.0 / n_organs, dtype=torch.float64)
    layers, experts = (updates[0].gate_mass.shape if updates[0].gate_mass.dim() == 2 else (0, 0))
    state, outcome = finish_round(noised, global_state, updates, cfg, server_round, previous_saliency,
                                  saliency=saliency, round_steps=plan.steps,
                                  director_usage=torch.ones(layers, experts, dtype=torch.float64))
    outcome.metrics["dp/noise_std"] = std
    outcome.metrics["dp/sampled"] = float(plan.sampled)
    return state, outcome


__all__ = ["SALIENCY", "add_noise", "dp_keys", "fixed_denominator", "private_round", "secure_generator"]

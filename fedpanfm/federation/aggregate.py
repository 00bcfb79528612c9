"""The server's aggregation maths: pure functions over state dicts (docs/federation.md).

A round is aggregated in three steps, each a pure function:

1. :func:`plan_means` splits the global keys into parameter groups (``param_groups``) and gives
   each group its per-site weights: subjects (shared), subjects holding the organ (organ
   tokenizers), routed gate mass (experts). Every group is then a weighted mean
   (:func:`mean_group`), independent of the others, so the groups can run in parallel
   (``orchestration.ray_aggregation``) or one by one (:func:`run_means_serial`).
2. :func:`finish_round` does what depends on the means: the directors' group EMA from the
   aggregated experts (``directors``), the teacher policy, the reset accumulators, the global saliency and
   the round's metrics.
3. :func:`aggregate_round` composes both.

No input tensor is ever modified; a group with no weight returns the previous tensor object.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedpanfm.config import ExperimentConfig
from fedpanfm.federation.message import SiteUpdate, state_nbytes
from fedpanfm.federation.directors import State, director_divergence, director_momentum, global_usage, update_directors
from fedpanfm.federation.param_groups import ParamGroup, classify, counterpart, group_keys
from fedpanfm.federation.influence import cap_subjects, cap_update_norms, lower_median, normalised_saliency
from fedpanfm.federation.privacy import SALIENCY, add_noise, clip_delta, dp_keys, fixed_denominator
from fedpanfm.federation.robust import robust_reduce
from fedpanfm.federation.saliency import aggregate_saliency
from fedpanfm.federation.validation import check_update, required_keys



#: Elements per block of :func:`weighted_mean`: 256 KiB of float32 partial sum (fits L2), and no
#: larger than torch's intra-op grain, so each op runs on one thread: on a busy machine a
#: two-thread op waits for a descheduled thread (measured 3-7x slower under load).
_MEAN_BLOCK = 65536

#: Sites summed in float32 before a float64 combine (see :func:`weighted_mean`).
_FP32_RUN = 16


def _normalised(weights: Sequence[float] | Tensor, sites: int) -> list[float] | None:
    """``weights / sum(weights)`` as floats after checking them; None when all are zero."""
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if sites != w.numel() or not sites:
        raise ValueError(f"weighted_mean: {sites} tensors for {w.numel()} weights")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"weighted_mean: weights must be finite and >= 0, got {w.tolist()}")
    total = float(w.sum())
    return None if total == 0.0 else (w / total).tolist()


def weighted_mean(tensors: Sequence[Tensor], weights: Sequence[float] | Tensor) -> Tensor | None:
    """sum_i w_i * t_i / sum_i w_i, returned in ``tensors[0]``'s dtype.

    Floating tensors are summed in float32 over runs of at most ``_FP32_RUN`` sites (the
    runs' partial sums combined in float64 when there are several); integer and bool tensors
    in float64, rounded back. Our design (docs/performance.md, item 5): the float32 run keeps
    every add a single vectorised same-dtype pass (a mixed float32 -> float64 add ran at half
    the speed), and its rounding error is bounded by the run length, not the federation size:
    |error| <= ~(_FP32_RUN + 1) * 2^-24 * sum_i |w_i t_i| / sum_i w_i per element, whatever the
    number of sites. Flower's FedAvg accumulates every site in float32.

    Args:
        tensors: one tensor per site, all the same shape.
        weights: one non-negative weight per site (normalised here).

    Returns:
        the mean, or None when every weight is zero ("keep the previous value").
    """
    wn = _normalised(weights, len(tensors))
    return None if wn is None else _blocked_mean(tensors, wn)


def _blocked_mean(tensors: Sequence[Tensor], wn: Sequence[float]) -> Tensor:
    """:func:`weighted_mean` with checked weights ``wn`` that sum to 1."""
    shape = tensors[0].shape
    for i, t in enumerate(tensors):
        if t.shape != shape:
            raise ValueError(f"weighted_mean: tensor {i} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    dtype = tensors[0].dtype
    terms = [(t.reshape(-1), wi) for t, wi in zip(tensors, wn) if wi]
    floating = dtype.is_floating_point
    run = _FP32_RUN if floating else 1
    runs = [terms[i : i + run] for i in range(0, len(terms), run)]
    n = shape.numel()
    out = torch.empty(n, dtype=dtype)
    step = min(n, _MEAN_BLOCK)
    # One run straight into ``out`` when it is float32 (no final copy); otherwise a float64
    # accumulator across runs.
    direct = floating and len(runs) == 1 and dtype == torch.float32
    part = out if direct else torch.empty(step, dtype=torch.float32 if floating else torch.float64)
    acc = None if direct else torch.empty(step, dtype=torch.float64)
    # Cache-blocked: a block's partial sum stays in cache while every site's slice is added,
    # so memory traffic is one read per input byte (docs/performance.md: a whole-tensor
    # accumulator ran at a tenth of copy bandwidth on 100M parameters).
    for lo in range(0, n, _MEAN_BLOCK):
        hi = min(n, lo + _MEAN_BLOCK)
        for r, sites in enumerate(runs):
            p = out[lo:hi] if direct else part[: hi - lo]
            (flat0, w0), rest = sites[0], sites[1:]
            if flat0.dtype == p.dtype:
                torch.mul(flat0[lo:hi], w0, out=p)
            else:
                # Widen first: a mixed mul would round w0 * t in the input's (narrower) dtype.
                p.copy_(flat0[lo:hi]).mul_(w0)
            for flat, wi in rest:
                p.add_(flat[lo:hi], alpha=wi)
            if acc is not None:
                a = acc[: hi - lo]
                a.copy_(p) if r == 0 else a.add_(p)
        if acc is not None:
            a = acc[: hi - lo]
            out[lo:hi].copy_(a if floating else a.round())
    return out.reshape(shape)


@dataclass(frozen=True)
class MeanTask:
    """One parameter group to average.

    Args:
        group: the group (for logs and metrics).
        keys: the state-dict keys of the group.
        weights: (n_sites,) float64 per-site weights, in update order.
        reducer: "mean" (weighted), or "median" / "trimmed_mean" (unweighted over the sites
            with a positive weight; ``federation.robust``, shared groups only).
        trim: the share cut at each end for "trimmed_mean".
    """

    group: ParamGroup
    keys: tuple[str, ...]
    weights: Tensor
    reducer: str = "mean"
    trim: float = 0.0


def mean_group(
    keys: Sequence[str], site_states: Sequence[Mapping[str, Tensor]], weights: Tensor, previous: Mapping[str, Tensor],
    reducer: str = "mean", trim: float = 0.0,
) -> State:
    """The weighted mean (or robust reduction) of each key over the sites, or the previous
    tensor if no site has weight.

    Args:
        keys: the group's state-dict keys.
        site_states: one state dict per site (holding at least ``keys``).
        weights: (n_sites,) non-negative weights.
        previous: the global state before the round (the fallback for an all-zero weight).
        reducer: "mean", "median" or "trimmed_mean" (see :class:`MeanTask`).
        trim: the trim share for "trimmed_mean".
    """
    out: State = {}
    try:
        wn = _normalised(weights, len(site_states))  # checked once for the group's keys
    except ValueError as exc:
        raise ValueError(f"key {keys[0] if keys else '?'!r}: {exc}") from None
    if wn is None:
        return {key: previous[key] for key in keys}
    voters = [i for i, wi in enumerate(wn) if wi > 0]
    for key in keys:
        try:
            if reducer != "mean" and voters and site_states[voters[0]][key].is_floating_point():
                out[key] = robust_reduce([site_states[i][key] for i in voters], reducer, trim)
                continue
            # A site may omit an expert it gave zero weight (check_update admits only that):
            # the previous tensor stands in for it and contributes nothing to the mean.
            tensors = [s[key] if key in s or wn[i] > 0 else previous[key] for i, s in enumerate(site_states)]
            out[key] = _blocked_mean(tensors, wn)
        except ValueError as exc:
            raise ValueError(f"key {key!r}: {exc}") from None
    return out


def run_means_serial(tasks: Sequence[MeanTask], site_states: Sequence[Mapping[str, Tensor]], previous: Mapping[str, Tensor]) -> State:
    """Every task's :func:`mean_group`, one after the other (the reference the Ray path matches)."""
    out: State = {}
    for task in tasks:
        out.update(mean_group(task.keys, site_states, task.weights, previous, task.reducer, task.trim))
    return out


RunMeans = Callable[[Sequence[MeanTask], Sequence[Mapping[str, Tensor]], Mapping[str, Tensor]], State]


# --------------------------------------------------------------------------- planning


def _uses_site_teacher(cfg: ExperimentConfig) -> bool:
    return cfg.federation.teacher_policy == "aggregate"


def plan_means(global_state: Mapping[str, Tensor], updates: Sequence[SiteUpdate], cfg: ExperimentConfig) -> list[MeanTask]:
    """The weighted-mean tasks of a round (everything but directors, accumulators and, unless
    the teacher policy is "aggregate", the teacher).

    Args:
        global_state: the global state before the round (defines the keys and groups).
        updates: the sites' checked updates (see :func:`check_update`).
        cfg: the experiment config (organ vocabulary, teacher policy).
    """
    organs = cfg.data.organ_set()
    subjects = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
    tasks: list[MeanTask] = []
    for group, keys in group_keys(global_state).items():
        if group.kind in ("director", "accumulator"):
            continue
        if group.role == "teacher" and not _uses_site_teacher(cfg):
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


# --------------------------------------------------------------------------- after the means


def server_ema_teacher(student: Mapping[str, Tensor], previous_teacher: Mapping[str, Tensor], momentum: float) -> State:
    """Global teacher = m * previous global teacher + (1 - m) * new global student, key by key.

    Args:
        student: the new global state (student keys are read).
        previous_teacher: the previous global teacher entries (``teacher.*`` keys).
        momentum: m in [0, 1].
    """
    out: State = {}
    for key, prev in previous_teacher.items():
        s = student[counterpart(key, "student")]
        if prev.dtype.is_floating_point:
            # One fused pass (lerp: prev + (1 - m) * (s - prev)) in the tensor's own precision;
            # the float64 temporaries it replaces made this the slowest part of a 100M round
            # (docs/performance.md). Differs from the float64 form by float round-off only.
            out[key] = torch.lerp(prev, s.to(prev.dtype), 1.0 - momentum)
        else:
            out[key] = s
    return out


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
        means: the output of the mean tasks (:func:`plan_means`).
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
                     ["student", "teacher"] if policy == "aggregate" else ["student"])
    teacher = {k: t for k, t in previous.items() if classify(k).role == "teacher" and k not in state}
    if policy == "server_ema":
        state.update(server_ema_teacher(state, teacher, cfg.federation.server_teacher_momentum))
    else:
        # "local": the sites keep their own teacher; the global teacher entries stay as they were.
        state.update(teacher)
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


def aggregate_round(
    global_state: Mapping[str, Tensor],
    updates: Sequence[SiteUpdate],
    cfg: ExperimentConfig,
    server_round: int,
    previous_saliency: Tensor | None = None,
    run_means: RunMeans = run_means_serial,
    plan: RoundPlan | None = None,
) -> tuple[State, RoundOutcome]:
    """One round of server aggregation.

    Without DP, each site's influence is bounded first (``federation.influence``: subject counts
    capped at ``subject_cap x`` the median, update norms at ``update_norm_cap x`` the median);
    with ``federation.dp`` the round is the private estimator (:func:`private_round`).

    Args:
        global_state: the global state dict before the round (never modified).
        updates: the sites' updates, each already checked with :func:`check_update`.
        cfg: the experiment config (teacher policy, DEX momenta, organ vocabulary).
        server_round: the round being closed, from 1.
        previous_saliency: last round's global saliency (None = uniform).
        run_means: executes the mean tasks (serial here; Ray in orchestration).
        plan: what the server fixed before the replies; required with ``federation.dp``.

    Returns:
        (new global state, outcome with the new global saliency and the round's metrics).
    """
    if not updates:
        raise ValueError(f"round {server_round}: no site update to aggregate")
    for u in updates:
        check_update(u, global_state, cfg)
    fed = cfg.federation
    if fed.dp.enabled:
        if plan is None:
            raise ValueError(f"round {server_round}: federation.dp needs the round's plan (sites sampled, steps)")
        return private_round(global_state, updates, cfg, server_round, plan, previous_saliency, run_means)
    updates, subject_scale = cap_subjects(updates, fed.subject_cap)
    updates, norm_scale = cap_update_norms(updates, global_state, fed.update_norm_cap)
    tasks = plan_means(global_state, updates, cfg)
    means = run_means(tasks, [u.state for u in updates], global_state)
    state, outcome = finish_round(means, global_state, updates, cfg, server_round, previous_saliency)
    outcome.influence = {u.site: {"subject_scale": subject_scale[u.site], "norm_scale": norm_scale[u.site]}
                         for u in updates}
    outcome.metrics["influence/subjects_capped"] = float(sum(v < 1 for v in subject_scale.values()))
    outcome.metrics["influence/norms_clipped"] = float(sum(v < 1 for v in norm_scale.values()))
    return state, outcome


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
    most ``clip_norm / plan.sampled`` (tests/test_dp_sensitivity.py).

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


__all__ = [
    "MeanTask",
    "RoundOutcome",
    "RoundPlan",
    "RunMeans",
    "aggregate_round",
    "check_update",
    "finish_round",
    "mean_group",
    "mean_site_metrics",
    "plan_means",
    "private_round",
    "required_keys",
    "run_means_serial",
    "server_ema_teacher",
    "weighted_mean",
]

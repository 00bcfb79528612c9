"""One round of server aggregation, composed from pure steps (docs/federation.md).

1. ``planning.plan_means`` splits the global keys into parameter groups and gives each group its
   per-site weights; ``means`` runs every group's weighted mean (serially here, or on Ray:
   ``orchestration.ray_aggregation`` passes its own ``run_means``);
2. ``outcome.finish_round`` does what depends on the means (directors, teacher, accumulators,
   saliency, metrics).

Without DP each site's influence is bounded first (``influence``); with ``federation.dp`` the
round is the private estimator (``privacy.private_round``). The updates arrive checked
(``validation.check_update``, once per reply, by the strategy that decoded them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from fedpanfm.config import ExperimentConfig
from fedpanfm.federation.directors import State
from fedpanfm.federation.influence import cap_subjects, cap_update_norms
from fedpanfm.federation.means import RunMeans, run_means_serial
from fedpanfm.federation.outcome import RoundOutcome, finish_round
from fedpanfm.federation.planning import RoundPlan, plan_means
from fedpanfm.federation.privacy import private_round
from fedpanfm.federation.protocol import SiteUpdate


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
        updates: the sites' updates, each already checked (``validation.check_update``).
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


__all__ = ["aggregate_round"]

"""Every number a site sends, checked before the server uses it (docs/security.md).

A reply that fails raises :class:`~fedpanfm.federation.tensor_codec.MessageError` naming the site
and the reason; the strategy drops it, logs it and counts it as that site's failure; the round
goes on with the others. The message decoders (``fedpanfm.federation.protocol``) already check
the structure (types, lengths, finite numbers, array keys and shapes before decoding); here
are the bounds that need the config and the global model.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from fedpanfm.config import ExperimentConfig
from fedpanfm.federation.deltas import delta_norm
from fedpanfm.federation.param_groups import classify
from fedpanfm.federation.protocol import SiteEvaluation, SiteUpdate
from fedpanfm.federation.teacher_policy import site_sends_teacher
from fedpanfm.federation.tensor_codec import MessageError


def required_keys(global_state: Mapping[str, Tensor], cfg: ExperimentConfig) -> list[str]:
    """The keys a site's reply must carry: all of them, less the teacher's unless the teacher
    policy has the sites send it (``teacher_policy.site_sends_teacher``)."""
    need_teacher = site_sends_teacher(cfg.federation.teacher_policy)
    return [k for k in global_state if need_teacher or classify(k).role != "teacher"]


def subject_limit(site: str, cfg: ExperimentConfig) -> tuple[int, str]:
    """(the most subjects a reply of ``site`` may claim, the config key that says so)."""
    fed = cfg.federation
    if site in fed.site_subjects:
        return min(fed.site_subjects[site], fed.max_site_subjects), f"federation.site_subjects.{site}"
    return fed.max_site_subjects, "federation.max_site_subjects"


def step_limit(subjects: int, cfg: ExperimentConfig) -> int:
    """The most optimiser steps ``subjects`` training subjects allow in one round: one per
    subject per local epoch (the smallest batch is one subject; a site's last batch may be
    short, and gradient accumulation only lowers the count)."""
    return cfg.train.epochs * max(1, subjects)


def check_metrics(metrics: Mapping[str, float], cfg: ExperimentConfig, where: str) -> None:
    """Every value within ``+-federation.max_metric`` (decoding already made them finite)."""
    bound = cfg.federation.max_metric
    for key, v in metrics.items():
        if abs(v) > bound:
            raise MessageError(f"{where}: metric {key!r} = {v:.4g} is beyond +-federation.max_metric = {bound:g}")


def check_evaluation(evaluation: SiteEvaluation, cfg: ExperimentConfig) -> None:
    """An evaluate reply's bounds: held-out subjects within what the site registered, every
    metric within ``+-federation.max_metric``."""
    where = f"site {evaluation.site}"
    limit, source = subject_limit(evaluation.site, cfg)
    if evaluation.num_examples > limit:
        raise MessageError(f"{where}: claims {evaluation.num_examples} held-out subjects, more than {source} = {limit}")
    check_metrics(evaluation.metrics, cfg, where)


def _expert_grid(global_state: Mapping[str, Tensor]) -> tuple[int, int]:
    """(blocks, experts) spanned by the expert keys; (0, 0) without DEX."""
    groups = [classify(k) for k in global_state]
    layers = [g.layer for g in groups if g.kind == "expert" and g.layer is not None]
    experts = [g.expert for g in groups if g.kind == "expert" and g.expert is not None]
    return (max(layers) + 1, max(experts) + 1) if layers else (0, 0)


def _omitted_expert(key: str, update: SiteUpdate) -> bool:
    """True if ``key`` is an expert the site may leave out: it reports zero gate mass for it, so
    the expert's weight in the mean is zero (sparse expert transfer, fedpanfm/federation/transfer.py)."""
    g = classify(key)
    gm = update.gate_mass
    return (g.kind == "expert" and g.layer is not None and g.expert is not None
            and g.layer < gm.shape[0] and g.expert < gm.shape[1] and float(gm[g.layer, g.expert]) == 0.0)


def check_update(update: SiteUpdate, global_state: Mapping[str, Tensor], cfg: ExperimentConfig) -> None:
    """Raise :class:`MessageError` unless ``update`` fits the global model and the documented
    bounds (docs/security.md, "Reply validation"): every required key, no unknown key, same
    shapes and dtype kinds (integer dtypes exactly); at most the subjects the site registered
    (:func:`subject_limit`); at most :func:`step_limit` optimiser steps; a saliency within
    ``[0, n_organs]`` (its units: shares x organs held; organs it holds none of are ignored);
    every training metric within ``+-federation.max_metric``; a gate-mass table covering every
    expert and no larger than its subjects could route; and (when ``federation.max_update_norm``
    > 0) ``||update - global||`` within that bound."""
    where = f"site {update.site}"
    fed = cfg.federation
    limit, source = subject_limit(update.site, cfg)
    if update.num_examples > limit:
        raise MessageError(f"{where}: claims {update.num_examples} training subjects, more than {source} = {limit}")
    steps = step_limit(update.num_examples, cfg)
    if update.steps > steps:
        raise MessageError(f"{where}: claims {update.steps} optimiser steps; {update.num_examples} subjects x "
                           f"{cfg.train.epochs} epoch(s) allow at most {steps}")
    n_organs = len(update.organ_names)
    sal = update.saliency
    if sal.numel() and (float(sal.max()) > n_organs or float(sal.min()) < 0):
        raise MessageError(f"{where}: saliency outside [0, {n_organs}] (its units: shares x organs held), "
                           f"max {float(sal.max()):.4g}")
    check_metrics(update.metrics, cfg, where)
    missing = [k for k in required_keys(global_state, cfg) if k not in update.state and not _omitted_expert(k, update)]
    if missing:
        raise MessageError(f"{where}: {len(missing)} weights missing, first {missing[0]!r}")
    unknown = [k for k in update.state if k not in global_state]
    if unknown:
        raise MessageError(f"{where}: unknown weight {unknown[0]!r}")
    for key, t in update.state.items():
        g = global_state[key]
        if t.shape != g.shape or t.dtype.is_floating_point != g.dtype.is_floating_point:
            raise MessageError(f"{where}: {key!r} is {t.dtype} {tuple(t.shape)}, the global model has {g.dtype} {tuple(g.shape)}")
        if not g.dtype.is_floating_point and t.dtype != g.dtype:
            raise MessageError(f"{where}: {key!r} is {t.dtype}, the global model has {g.dtype}")
    layers, experts = _expert_grid(global_state)
    if layers and (update.gate_mass.shape[0] < layers or update.gate_mass.shape[1] != experts):
        raise MessageError(
            f"{where}: gate mass of shape {tuple(update.gate_mass.shape)} does not cover {layers} blocks x {experts} experts"
        )
    if layers and float(update.gate_mass[:layers].sum()) <= 0:
        raise MessageError(f"{where}: gate mass is all zero although the model has DEX layers (missing stats)")
    if layers:
        # Routing is per subject (from the CLS token) with gates <= 1, and each training subject
        # passes each block once per epoch: no expert can receive more than epochs * subjects.
        bound = cfg.train.epochs * update.num_examples * (1 + 1e-6)
        worst = int(update.gate_mass[:layers].argmax())
        l, e = divmod(worst, update.gate_mass.shape[1])
        if float(update.gate_mass[l, e]) > bound:
            raise MessageError(f"{where}: gate mass {float(update.gate_mass[l, e]):.1f} of block {l} expert {e} exceeds "
                               f"what {update.num_examples} subjects x {cfg.train.epochs} epochs can route ({bound:.1f})")
    if fed.max_update_norm > 0:
        keys = [k for k, t in update.state.items() if t.is_floating_point() and classify(k).kind != "accumulator"]
        norm = delta_norm(update.state, global_state, keys)
        if norm > fed.max_update_norm:
            raise MessageError(f"{where}: update norm ||update - global|| = {norm:.4g} exceeds "
                               f"federation.max_update_norm = {fed.max_update_norm:.4g}")


__all__ = ["check_evaluation", "check_metrics", "check_update", "required_keys", "step_limit", "subject_limit"]

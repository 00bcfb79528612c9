"""The site's handlers: one round of local training, and validation, on the site's own subjects.

``train_site``: decode the server's :class:`TrainInstruction`, load the global weights plus what
this site keeps for itself (``sites/runtime.py``), train ``cfg.train.epochs`` local epochs with
the federation's organ saliency blended into SGM, and reply a :class:`SiteUpdate`.
``evaluate_site``: the SSL losses of the global weights on the site's held-out subjects.

Both run in the ClientApp process (``sites/client_app.py``) or in the site's trainer worker
(``sites/worker/server.py``); torch, DeepSpeed and the training modules are imported inside
them, so importing this module stays cheap for the thin ClientApp.
"""

from __future__ import annotations

import logging
import math

from flwr.app import Context, Message

from fedpanfm.config import ExperimentConfig

log = logging.getLogger(__name__)


def train_site(msg: Message, context: Context, cfg: ExperimentConfig) -> Message:
    """One round of local training; the reply content is a :class:`SiteUpdate`.

    Args:
        msg: the server's message; its content is a :class:`TrainInstruction`.
        context: this node's context (``node_config`` names the site, ``state`` keeps the
            site's local state between rounds).
        cfg: the experiment config.
    """
    import torch

    from fedpanfm.federation.protocol import METRICS, SiteUpdate, TrainInstruction
    from fedpanfm.federation.transfer import select_transfer
    from fedpanfm.spans import SpanTimer
    from fedpanfm.train.engine import get_trainer
    from sites.faults import apply_fault
    from sites.multi_device import fit_on_devices, site_devices
    from sites.runtime import SiteRuntime, site_seed
    from sites.step_curves import step_curves

    spans = SpanTimer()
    organs = cfg.data.organ_set()
    instr = TrainInstruction.from_recorddict(msg.content, organs.names)
    state = instr.state()
    # What the server sent, before the site's own tensors are laid over it: with bf16 transfer
    # the reply carries bf16(new - received), which the server adds to its fp32 master.
    received = dict(state)
    spans.mark("decode")
    site = SiteRuntime.from_context(context, cfg)
    apply_fault(site.name, instr.server_round)  # test-only, FEDPANFM_FAULT (sites/faults.py); no-op unset
    kept, schedule = site.load_kept(context)
    spans.mark("site")

    # The global weights, then the site's own tensors over them (local saliency; the teacher
    # under teacher_policy "local").
    state.update(kept)
    position = site.schedule_position(schedule, instr.start_step, instr.total_steps, instr.num_rounds)
    # Masking and router noise draw from torch's global RNG; seed it per (site, round) so a
    # site's round does not depend on which sites this process served before.
    seed = site_seed(site.name, cfg.seed) + instr.server_round
    saliency = torch.tensor(instr.global_saliency, dtype=torch.float32)
    devices = site_devices(cfg, context.node_config)
    if devices > 1:  # one DeepSpeed process per device, started and supervised there
        fit = fit_on_devices(cfg, site, state, position, instr.server_round, seed, saliency, devices)
        result, new_state, new_schedule = fit.result, fit.state, fit.schedule
        spans.mark("fit_call")
    else:
        trainer = get_trainer(cfg)
        trainer.load_state(state)
        trainer.reset_optimizer()
        trainer.set_schedule_state(position)
        spans.mark("load")
        torch.manual_seed(seed)
        loader = site.loader("train", round_seed=instr.server_round)
        with step_curves(context.node_config, site.name, cfg) as on_step:  # sites/step_curves.py
            result = trainer.fit(loader, cfg.train.epochs, position["total_steps"], global_saliency=saliency,
                                 on_step=on_step)
        spans.mark("fit_call")
        new_state, new_schedule = trainer.export_state(), trainer.schedule_state()
        spans.mark("export")
    site.keep(context, new_state, new_schedule)
    spans.mark("keep")
    # Only what the server reads goes back (no teacher unless the policy aggregates it; with
    # federation.sparse_experts no unused expert), in federation.transfer_dtype (bf16: as
    # deltas against ``received`` where the server sent the key).
    sent, gate_mass = select_transfer(new_state, result.gate_mass, cfg)
    spans.mark("select")
    # NaN marks a per-organ value for an organ this site never saw: left out, not invented.
    metrics = {k: float(v) for k, v in result.metrics.items() if math.isfinite(float(v))}
    metrics["time/fit_s"] = result.seconds
    update = SiteUpdate(
        site=site.name,
        state=sent,
        num_examples=result.subjects,
        organ_subjects=result.organ_subjects,
        gate_mass=gate_mass,
        # Organs the site lacks carry no weight in the server's saliency blend (weighted by
        # organ_subjects, 0 for them), so their NaN travels as 0.
        saliency=result.saliency.nan_to_num(0.0),
        organ_names=list(organs.names),
        metrics=metrics,
        steps=result.steps,
    )
    content = update.to_recorddict(cfg.federation.transfer_dtype, reference=received)
    spans.mark("encode")
    # Where the site's call went (seconds): travels with the training metrics, so the server
    # logs it per site and as the federation mean (docs/performance.md, item 4).
    for tag, sec in spans.tagged("time/").items():
        content.metric_records[METRICS][tag] = sec
    log.info("site %s: round %d trained %d steps on %d subjects in %.1f s",
             site.name, instr.server_round, result.steps, result.subjects, result.seconds)
    return Message(content, reply_to=msg)


def evaluate_site(msg: Message, context: Context, cfg: ExperimentConfig) -> Message:
    """SSL losses of the global weights on the site's held-out subjects.

    The reply content is a :class:`SiteEvaluation` (held-out subjects, ``val/<metric>`` per
    model metric).

    Args:
        msg: the server's message; content ``arrays`` holds the global weights.
        context: this node's context.
        cfg: the experiment config.
    """
    from fedpanfm.federation.protocol import ARRAYS, SiteEvaluation
    from fedpanfm.federation.tensor_codec import arrayrecord_to_state
    from fedpanfm.train.engine import get_trainer
    from sites.runtime import SiteRuntime

    site = SiteRuntime.from_context(context, cfg)
    if not site.val_ids:
        raise ValueError(f"site {site.name}: no held-out subjects to evaluate on (data.val_fraction = "
                         f"{cfg.data.val_fraction}, {len(site.train_ids)} subjects)")
    if ARRAYS not in msg.content.array_records:
        raise ValueError(f"site {site.name}: evaluate message has no ArrayRecord {ARRAYS!r}")
    kept, schedule = site.load_kept(context)
    trainer = get_trainer(cfg)
    state = arrayrecord_to_state(msg.content.array_records[ARRAYS], "server evaluate message")
    state.update(kept)
    trainer.load_state(state)
    # The site's own schedule position (teacher temperature): the process may last have served
    # another site. A site that has not trained yet evaluates at the start of its schedule.
    trainer.set_schedule_state(schedule or {"step": 0, "total_steps": cfg.federation.rounds * site.steps_per_round()})
    values = trainer.evaluate(site.loader("val"))
    evaluation = SiteEvaluation(site=site.name, num_examples=len(site.val_ids),
                                metrics={f"val/{k}": float(v) for k, v in values.items() if math.isfinite(float(v))})
    return Message(evaluation.to_recorddict(), reply_to=msg)

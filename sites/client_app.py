"""The site's Flower ClientApp: local SSL training and validation on the site's own subjects.

``train``: decode the server's :class:`TrainInstruction`, load the global weights plus what
this site keeps for itself (``sites/runtime.py``), train ``cfg.train.epochs`` local epochs
with the federation's organ saliency blended into SGM, and reply a :class:`SiteUpdate`.
``evaluate``: the SSL losses of the global weights on the site's held-out subjects.

The experiment config comes from the run config (keys ``config`` and ``overrides``, from
``pyproject.toml`` ``[tool.flwr.app.config]`` or ``flwr run --run-config``). Flower's in-process
simulation gives apps an empty run config, so ``build_client_app(run_config)`` makes an app
that carries its own; the module-level ``app`` reads the context's.

Errors are not caught: Flower turns them into a failed reply, which the strategy tolerates.
We log one line naming the site first, so the failure can be traced to its site.

Deployment: a node config naming a ``trainer-socket`` makes this process thin: it forwards the
message to the site's long-lived trainer worker (``sites/worker.py``), which keeps the DeepSpeed
engine across rounds. torch, DeepSpeed and the training modules are therefore imported inside
the functions that train, so the thin path never loads them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpanfm.config import ExperimentConfig, config_from_run_config
from sites.worker import WorkerTarget, WorkerUnavailable, call_worker

log = logging.getLogger(__name__)

Handler = Callable[[Message, Context], Message]


def _site_label(context: Context) -> str:
    nc = context.node_config
    if "site-name" in nc:
        return f"site {nc['site-name']}"
    return f"site partition {nc.get('partition-id', '?')} (node {context.node_id})"


_CONFIGS: dict[tuple[Any, ...], ExperimentConfig] = {}


def _config(run_config: Mapping[str, Any]) -> ExperimentConfig:
    """``config_from_run_config(run_config)``, parsed once per process while the run config and
    the config file's modification time stay the same: parsing the YAML and overrides took
    ~10 ms of every site call (docs/performance.md, item 4). Configs are never modified."""
    path = Path(str(run_config.get("config", "")))
    try:
        mtime = path.stat().st_mtime_ns if not run_config.get("config-yaml") else None
    except OSError:
        mtime = None  # no such file: config_from_run_config raises the clear error below
    key = (tuple(sorted((str(k), str(v)) for k, v in run_config.items())), mtime)
    cfg = _CONFIGS.get(key)
    if cfg is None:
        cfg = config_from_run_config(run_config)
        if len(_CONFIGS) >= 8:
            _CONFIGS.clear()
        _CONFIGS[key] = cfg
    return cfg


def _logged(what: str, fn: Callable[[Message, Context, ExperimentConfig], Message],
            run_config: Mapping[str, Any] | None) -> Handler:
    """Wrap a handler: resolve the config, and log a line naming the site before re-raising."""

    def handler(msg: Message, context: Context) -> Message:
        try:
            resolved = run_config if run_config is not None else context.run_config
            target = WorkerTarget.from_node_config(context.node_config)
            if target is not None:
                try:
                    content, stats = call_worker(target, what, msg, context, resolved)
                    log.info("%s: %s ran in trainer worker %s in %.2f s", _site_label(context), what,
                             stats.get("pid"), stats.get("seconds", float("nan")))
                    return Message(content, reply_to=msg)
                except WorkerUnavailable as exc:
                    if target.fallback == "fail":
                        raise
                    log.warning("%s: %s; %s runs in this ClientApp process instead (trainer-fallback=local)",
                                _site_label(context), exc, what)
            elif "site-name" in context.node_config:
                log.info("%s: no trainer-socket in the node config: %s runs in this ClientApp process",
                         _site_label(context), what)
            return fn(msg, context, _config(resolved))
        except Exception as exc:
            log.error("%s: %s failed: %s: %s", _site_label(context), what, type(exc).__name__, exc)
            raise

    return handler


def train_site(msg: Message, context: Context, cfg: ExperimentConfig) -> Message:
    """One round of local training; the reply content is a :class:`SiteUpdate`.

    Args:
        msg: the server's message; its content is a :class:`TrainInstruction`.
        context: this node's context (``node_config`` names the site, ``state`` keeps the
            site's local state between rounds).
        cfg: the experiment config.
    """
    import torch

    from fedpanfm.federation.message import METRICS, SiteUpdate, TrainInstruction
    from fedpanfm.federation.transfer import select_transfer
    from fedpanfm.spans import SpanTimer
    from fedpanfm.train.engine import get_trainer
    from sites.faults import apply_fault
    from sites.runtime import SiteRuntime, site_seed

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

    trainer = get_trainer(cfg)
    # The global weights, then the site's own tensors over them (local saliency; the teacher
    # under teacher_policy "local").
    state.update(kept)
    trainer.load_state(state)
    trainer.reset_optimizer()
    position = site.schedule_position(schedule, instr.start_step, instr.total_steps, instr.num_rounds)
    trainer.set_schedule_state(position)
    spans.mark("load")

    # Masking and router noise draw from torch's global RNG; seed it per (site, round) so a
    # site's round does not depend on which sites this process served before.
    torch.manual_seed(site_seed(site.name, cfg.seed) + instr.server_round)
    loader = site.loader("train", round_seed=instr.server_round)
    saliency = torch.tensor(instr.global_saliency, dtype=torch.float32)
    result = trainer.fit(loader, cfg.train.epochs, position["total_steps"], global_saliency=saliency)
    spans.mark("fit_call")

    new_state = trainer.export_state()
    spans.mark("export")
    site.keep(context, new_state, trainer.schedule_state())
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
        transfer_dtype=cfg.federation.transfer_dtype,
        reference=received,
    )
    content = update.to_recorddict()
    spans.mark("encode")
    # Where the site's call went (seconds): travels with the training metrics, so the server
    # logs it per site and as the federation mean (docs/performance.md, item 4).
    for tag, sec in spans.tagged("time/").items():
        content[METRICS][tag] = sec
    log.info("site %s: round %d trained %d steps on %d subjects in %.1f s",
             site.name, instr.server_round, result.steps, result.subjects, result.seconds)
    return Message(content, reply_to=msg)


def evaluate_site(msg: Message, context: Context, cfg: ExperimentConfig) -> Message:
    """SSL losses of the global weights on the site's held-out subjects.

    The reply holds a MetricRecord ``metrics`` (``num-examples`` = held-out subjects, and
    ``val/<metric>`` per model metric) and a ConfigRecord ``site`` naming the site.

    Args:
        msg: the server's message; content ``arrays`` holds the global weights.
        context: this node's context.
        cfg: the experiment config.
    """
    from fedpanfm.federation.message import ARRAYS, METRICS, NUM_EXAMPLES, PROTOCOL_VERSION, SITE_CONFIG, arrayrecord_to_state
    from fedpanfm.train.engine import get_trainer
    from sites.runtime import SiteRuntime

    site = SiteRuntime.from_context(context, cfg)
    if not site.val_ids:
        raise ValueError(f"site {site.name}: no held-out subjects to evaluate on (data.val_fraction = "
                         f"{cfg.data.val_fraction}, {len(site.train_ids)} subjects)")
    if ARRAYS not in msg.content:
        raise ValueError(f"site {site.name}: evaluate message has no ArrayRecord {ARRAYS!r}")
    kept, schedule = site.load_kept(context)
    trainer = get_trainer(cfg)
    state = arrayrecord_to_state(msg.content[ARRAYS], "server evaluate message")
    state.update(kept)
    trainer.load_state(state)
    # The site's own schedule position (teacher temperature): the process may last have served
    # another site. A site that has not trained yet evaluates at the start of its schedule.
    trainer.set_schedule_state(schedule or {"step": 0, "total_steps": cfg.federation.rounds * site.steps_per_round()})
    values = trainer.evaluate(site.loader("val"))
    metrics = MetricRecord({NUM_EXAMPLES: len(site.val_ids),
                            **{f"val/{k}": float(v) for k, v in values.items() if math.isfinite(float(v))}})
    site_rec = ConfigRecord({"protocol-version": PROTOCOL_VERSION, "site-name": site.name})
    return Message(RecordDict({METRICS: metrics, SITE_CONFIG: site_rec}), reply_to=msg)


def build_client_app(run_config: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp running :func:`train_site` and :func:`evaluate_site`.

    Args:
        run_config: ``{"config": path, "overrides": "K=V ..."}`` to use instead of the
            context's run config (in-process simulation, where Flower passes none); None reads
            ``context.run_config``.
    """
    client = ClientApp()
    client.train()(_logged("train", train_site, run_config))
    client.evaluate()(_logged("evaluate", evaluate_site, run_config))
    return client


app = build_client_app()

"""The coordinator's Flower ServerApp: runs the federation and records it.

``main(grid, context)``: load the experiment config from the run config (``config`` path and
``overrides``), build the seeded initial ``PanFMSSL`` weights, connect Ray for aggregation,
run :class:`~orchestration.strategy.FedPanFM` for ``cfg.federation.rounds`` rounds, and after
each round write TensorBoard scalars and a checkpoint; at the end a summary.

The run folder (``<logging.run_dir>/<name>-<timestamp>`` unless the run config's
``run-folder`` names one)::

    config.yaml            the resolved experiment config
    tensorboard/server/    global metrics per round (+ hyper-parameters once)
    tensorboard/site_<n>/  one sub-run per site, the same tags for every site
    checkpoints/           round_<k>/, best, latest (orchestration/checkpoints.py)
    summary.json

Sites' metrics arrive in their replies; the server writes the site sub-runs, so no shared
filesystem is assumed. The server observes the traffic at the Grid (:class:`MeteredGrid`):
that is where bytes exchanged and the sites' validation replies are seen.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedpanfm.config import ExperimentConfig, config_from_run_config
from fedpanfm.federation.message import METRICS, NUM_EXAMPLES, SITE_CONFIG, arrayrecord_to_state, state_to_arrayrecord
from fedpanfm.model.meta_arch import PanFMSSL
from fedpanfm.tb import RunLogger, site_run_name
from orchestration.checkpoints import CheckpointPolicy
from orchestration.ray_aggregation import make_aggregator
from orchestration.strategy import FedPanFM, RoundReport

log = logging.getLogger(__name__)

#: The validation tag a round's ``best`` checkpoint is chosen by (mean over sites by subjects).
VAL_LOSS = "val/loss"


def initial_state(cfg: ExperimentConfig) -> dict[str, torch.Tensor]:
    """The seeded initial global weights: a fresh ``PanFMSSL(cfg)`` state dict in fp32.

    Args:
        cfg: the experiment config (``seed`` fixes the initialisation).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = PanFMSSL(cfg)
    return {k: (v.float() if v.is_floating_point() else v).detach().contiguous() for k, v in model.state_dict().items()}


def planned_steps(cfg: ExperimentConfig) -> int:
    """Nominal optimiser steps of the whole run, for the schedule position sent to sites.

    The server does not see the sites' data, so this is a plan from the config (a site of
    ``synth.subjects`` subjects); sites read ``start-step / total-steps`` as the share of the
    run done and size their schedules by their own data (sites/client_app.py).
    """
    train_subjects = max(1, round(cfg.synth.subjects * (1.0 - cfg.data.val_fraction)))
    per_epoch = math.ceil(train_subjects / cfg.data.batch_size) // cfg.deepspeed.gradient_accumulation_steps
    return max(1, cfg.federation.rounds * cfg.train.epochs * max(1, per_epoch))


class MeteredGrid:
    """A Grid that counts the bytes of the arrays it carries and keeps the evaluate replies.

    Args:
        grid: the Grid Flower handed to ``main``; everything else is delegated to it.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.bytes_sent = 0
        self.bytes_received = 0
        self.evaluate_replies: list[Message] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self.bytes_sent += sum(_array_bytes(m) for m in messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.bytes_received += sum(_array_bytes(m) for m in replies if m.has_content())
        self.evaluate_replies = [m for m in replies if m.metadata.message_type.startswith("evaluate")]
        return replies


def _array_bytes(msg: Message) -> int:
    return sum(rec.count_bytes() for rec in msg.content.array_records.values()) if msg.has_content() else 0


def site_validation(replies: Iterable[Message]) -> dict[str, tuple[int, dict[str, float]]]:
    """Site name -> (held-out subjects, ``val/<metric>`` values) from evaluate replies.

    Error replies are skipped (the strategy already logged them).
    """
    out: dict[str, tuple[int, dict[str, float]]] = {}
    for msg in replies:
        if msg.has_error() or SITE_CONFIG not in msg.content or METRICS not in msg.content:
            continue
        m = msg.content[METRICS]
        out[str(msg.content[SITE_CONFIG]["site-name"])] = (
            int(m[NUM_EXAMPLES]), {k: float(v) for k, v in m.items() if k != NUM_EXAMPLES})
    return out


class RunRecorder:
    """TensorBoard and checkpoints of one federated run, fed by the strategy and the Grid.

    Args:
        run_folder: the run folder (created).
        cfg: the experiment config.
        grid: the metered Grid the strategy talks through.
    """

    def __init__(self, run_folder: Path, cfg: ExperimentConfig, grid: MeteredGrid) -> None:
        self.folder = Path(run_folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "config.yaml").write_text(cfg.to_yaml())
        self.cfg = cfg
        self.grid = grid
        self.tb_dir = self.folder / "tensorboard"
        self.server = RunLogger(self.tb_dir, "server")
        self.sites: dict[str, RunLogger] = {}
        self.checkpoints = CheckpointPolicy(self.folder / "checkpoints", cfg)
        self.report: RoundReport | None = None
        self.history: list[dict[str, float]] = []
        self._t_round = time.perf_counter()

    def _site(self, name: str) -> RunLogger:
        if name not in self.sites:
            self.sites[name] = RunLogger(self.tb_dir, site_run_name(name))
        return self.sites[name]

    def on_round(self, report: RoundReport) -> None:
        """Strategy hook after aggregation: keep the report; write the sites' training scalars."""
        self.report = report
        for name, values in report.site_metrics.items():
            # The "train/" prefix the server uses for the site means, so the curves overlay.
            self._site(name).scalars({f"train/{k}": v for k, v in values.items()}, report.server_round)

    def after_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """``evaluate_fn`` of ``strategy.start``: called after each round's evaluation (and
        once before round 1, where only the start time is taken)."""
        if server_round == 0:
            self._t_round = time.perf_counter()
            return None
        validation = site_validation(self.grid.evaluate_replies)
        for name, (_, values) in validation.items():
            self._site(name).scalars(values, server_round)
        n_val = sum(n for n, _ in validation.values())
        val = {}
        if n_val:
            keys = set.intersection(*(set(v) for _, v in validation.values()))
            val = {k: sum(n * v[k] for n, v in validation.values()) / n_val for k in sorted(keys)}
        now = time.perf_counter()
        scalars = {
            **(self.report.metrics if self.report and self.report.server_round == server_round else {}),
            **val,
            "time/round_s": now - self._t_round,
            "bytes/sent_total": float(self.grid.bytes_sent),
            "bytes/received_total": float(self.grid.bytes_received),
        }
        self._t_round = now
        self.server.scalars(scalars, server_round)
        self.server.flush()
        for logger in self.sites.values():
            logger.flush()
        self.history.append({"round": server_round, **scalars})
        state = arrayrecord_to_state(arrays, f"global arrays of round {server_round}")
        self.checkpoints.submit(server_round, state, val.get(VAL_LOSS),
                                {"sites": sorted(validation) or sorted(self.report.site_metrics if self.report else [])})
        return MetricRecord({k: v for k, v in val.items()}) if val else None

    def finish(self) -> dict[str, Any]:
        """Wait for the checkpoint writes, record hyper-parameters, close the logs; the summary."""
        self.checkpoints.close()
        last = self.history[-1] if self.history else {}
        final = {f"final/{k}": v for k, v in last.items() if k.startswith(("train/loss", "val/loss"))}
        self.server.hparams(_flat_hparams(self.cfg), final)
        for logger in [self.server, *self.sites.values()]:
            logger.close()
        ck = self.folder / "checkpoints"
        summary = {
            "run_folder": str(self.folder),
            "rounds": len(self.history),
            "sites": sorted(self.sites),
            "final_train_loss": last.get("train/loss"),
            "final_val_loss": last.get(VAL_LOSS),
            "best_round": self.checkpoints.best_round,
            "best_val_loss": self.checkpoints.best_loss if self.checkpoints.best_round else None,
            "tensorboard": str(self.tb_dir),
            "checkpoint_latest": str(ck / "latest"),
            "checkpoint_best": str(ck / "best") if self.checkpoints.best_round else None,
            "seconds_per_round": [h["time/round_s"] for h in self.history],
        }
        (self.folder / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def _flat_hparams(cfg: ExperimentConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                if prefix == "data." and k == "organs":
                    continue  # per-organ grids: many keys, not hyper-parameters one sweeps
                walk(f"{prefix}{k}.", v)
        else:
            out[prefix[:-1]] = node if isinstance(node, (bool, int, float, str)) else str(node)

    walk("", cfg.to_dict())
    return out


def new_run_folder(cfg: ExperimentConfig) -> Path:
    """``<cfg.logging.run_dir>/<cfg.name>-<YYYYmmdd-HHMMSS>`` (a ``-<n>`` suffix if taken)."""
    base = Path(cfg.logging.run_dir) / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    return path


def await_simulation_ray(grid: Grid, timeout_s: float = 300.0) -> None:
    """In simulation, wait for the simulation runtime's Ray instead of starting a second one.

    Flower's simulation runtime starts the ServerApp thread first and then initialises Ray in
    the same process; a ServerApp that called ``ray.init`` meanwhile would race it ("ray.init
    twice"). Outside simulation (a deployment Grid) this returns at once.

    Args:
        grid: the Grid handed to ``main``; an in-memory Grid means simulation.
        timeout_s: how long to wait for the runtime's Ray.
    """
    import ray
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    if not isinstance(grid, InMemoryGrid) or ray.is_initialized():
        return
    deadline = time.monotonic() + timeout_s
    while not ray.is_initialized():
        if time.monotonic() > deadline:
            raise RuntimeError(f"simulation: Ray was not started by the simulation runtime within {timeout_s:.0f} s")
        time.sleep(0.2)


def run_federation(grid: Grid, run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The ServerApp's work; returns the run summary (also written to ``summary.json``).

    Args:
        grid: Flower's Grid to the site nodes.
        run_config: ``config`` (experiment YAML), ``overrides`` (``K=V ...``) and optionally
            ``run-folder`` (where to write; "" or absent: a new time-stamped folder).
    """
    import ray

    cfg = config_from_run_config(run_config)
    folder = Path(str(run_config.get("run-folder") or "")) if run_config.get("run-folder") else new_run_folder(cfg)
    if cfg.federation.ray.enabled:
        await_simulation_ray(grid)
    had_ray = ray.is_initialized()
    aggregator = make_aggregator(cfg)
    metered = MeteredGrid(grid)
    recorder = RunRecorder(folder, cfg, metered)
    strategy = FedPanFM(
        cfg, planned_steps(cfg), aggregator=aggregator, on_round=recorder.on_round,
        # Sites evaluate only when they hold out subjects.
        fraction_evaluate=1.0 if cfg.data.val_fraction > 0 else 0.0,
    )
    log.info("fedpanfm run %s: %d rounds, writing to %s", cfg.name, cfg.federation.rounds, folder)
    try:
        strategy.start(
            grid=metered,  # type: ignore[arg-type]  # duck-typed Grid (delegates to Flower's)
            initial_arrays=state_to_arrayrecord(initial_state(cfg)),
            num_rounds=cfg.federation.rounds,
            timeout=cfg.federation.round_timeout_s,
            evaluate_fn=recorder.after_round,
        )
    finally:
        summary = recorder.finish()
        if not had_ray and ray.is_initialized():
            ray.shutdown()  # we started it (deployment): leave nothing behind
    log.info("%s\n  summary: %s", summary_text(summary), folder / "summary.json")
    return summary


def summary_text(s: Mapping[str, Any]) -> str:
    """The run summary a person reads at the end of a federation."""
    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    return "\n".join([
        f"fedpanfm: {s['rounds']} rounds over sites {', '.join(s['sites'])}",
        f"  final train loss {fmt(s['final_train_loss'])}, final val loss {fmt(s['final_val_loss'])}, "
        f"best val loss {fmt(s['best_val_loss'])} (round {s['best_round']})",
        f"  TensorBoard: tensorboard --logdir {s['tensorboard']}",
        f"  checkpoints: {s['checkpoint_latest']} (latest), {s['checkpoint_best']} (best)",
    ])


def build_server_app(run_config: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp running :func:`run_federation`.

    Args:
        run_config: the run config to use instead of the context's (in-process simulation,
            where Flower passes none); None reads ``context.run_config``.
    """
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, run_config if run_config is not None else context.run_config)

    return server


app = build_server_app()

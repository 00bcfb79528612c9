"""The coordinator's Flower ServerApp: runs the federation and records it.

``main(grid, context)``: load the experiment config from the run config (``config`` path and
``overrides``), build the seeded initial ``PanFMSSL`` weights, connect Ray for aggregation,
run :class:`~orchestration.strategy.FedPanFM` for ``cfg.federation.rounds`` rounds, and after
each round write TensorBoard scalars and a checkpoint; at the end a summary.

The run folder (``<logging.run_dir>/<name>-federation-<time>`` unless the run config's
``run-folder`` names one)::

    config.yaml            the resolved experiment config
    tensorboard/server/    global metrics per round (+ hyper-parameters once)
    tensorboard/site_<n>/  one sub-run per site, the same tags for every site
    checkpoints/           round_<k>/, best, latest (orchestration/checkpoints.py)
    summary.json
    cohort_statistics.csv/.json  the sites' cohort statistics before round 1 (aggregates only)

(``fedpanfm simulate`` adds run.log, command.txt, environment.json: fedpanfm/run_folder.py; in a
deployment the ServerApp and ``federation run`` do: orchestration/deployed_run.py.)
Each round also goes to the :data:`fedpanfm.console.ROUNDS` logger as one line
(orchestration/round_lines.py) and to TensorBoard as pictures (orchestration/round_images.py).

Sites' metrics arrive in their replies; the server writes the site sub-runs, so no shared
filesystem is assumed. The server observes the traffic at the Grid (:class:`MeteredGrid`):
that is where bytes exchanged are counted. The sites' validation metrics are the strategy's
checked evaluate replies, handed over by ``FedPanFM.aggregate_evaluate`` (``on_evaluate``).

Each round's checkpoint carries the server state (orchestration/resume.py); run config
``resume`` = a run folder continues that run after its last complete round
(docs/reliability.md). Per round the server also logs ``failures/<site>`` (cumulative),
``memory/rss_mb`` and, with ``federation.dp``, ``dp/epsilon`` (also on the console and in the
summary); with ``federation.dp.max_epsilon`` the run ends after the last round the budget
allows, that round's checkpoint being the final one (docs/security.md).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedpanfm.config import ExperimentConfig, config_from_dict, config_from_run_config
from fedpanfm.console import ROUNDS
from fedpanfm.federation.accounting import GaussianAccountant
from fedpanfm.federation.protocol import SiteEvaluation
from fedpanfm.federation.site_allowlist import check_sites_accept
from fedpanfm.federation.tensor_codec import arrayrecord_to_state, state_to_arrayrecord
from fedpanfm.model.meta_arch import PanFMSSL
from fedpanfm.run_folder import new_run_folder as named_run_folder
from fedpanfm.spans import SpanTimer
from fedpanfm.tb import federation_layout
from orchestration.checkpoints import CheckpointPolicy
from orchestration.cohort_statistics import statistics_round
from orchestration.deployed_run import deployed_run
from orchestration.ray_aggregation import make_aggregator
from orchestration.resume import SERVER, ResumePoint, find_resume_point, resume_command, resume_config, server_state
from orchestration.round_images import RoundPictures
from orchestration.round_lines import RoundLines, round_status
from orchestration.run_board import RunBoard
from orchestration.run_summary import VAL_LOSS, RunSummary, summary_text
from orchestration.server_eval import ServerProbe
from orchestration.strategy import EvaluationReport, FedPanFM, RoundReport

log = logging.getLogger(__name__)

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
    """A Grid that counts the bytes of the arrays it carries.

    Args:
        grid: the Grid Flower handed to ``main``; everything else is delegated to it.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.bytes_sent = 0
        self.bytes_received = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self.bytes_sent += sum(_array_bytes(m) for m in messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.bytes_received += sum(_array_bytes(m) for m in replies if m.has_content())
        return replies


def _array_bytes(msg: Message) -> int:
    return sum(rec.count_bytes() for rec in msg.content.array_records.values()) if msg.has_content() else 0


def accountant(cfg: ExperimentConfig) -> GaussianAccountant | None:
    """The run's privacy accountant (fedpanfm/federation/accounting.py); None without DP."""
    dp = cfg.federation.dp
    return GaussianAccountant(dp.noise_multiplier, dp.delta, dp.max_epsilon) if dp.enabled else None


class RunRecorder:
    """What one federated run leaves on disk, fed by the strategy and the Grid: TensorBoard
    (:class:`~orchestration.run_board.RunBoard`), checkpoints, the console's round lines and
    ``summary.json`` (:class:`~orchestration.run_summary.RunSummary`).

    Args:
        run_folder: the run folder (created).
        cfg: the experiment config.
        grid: the metered Grid the strategy talks through.
        resume: the point a resumed run continues from (None: a fresh run); TensorBoard
            continues at its next round (events an interrupted round wrote are purged).
        saliency: returns the strategy's current global saliency (stored with checkpoints).
        global_state: returns the strategy's current global weights as tensors (what
            ``after_round`` gets encoded), so they are not decoded again; None decodes them.

    The sites' validation arrives through :meth:`on_evaluate` (the strategy's
    ``aggregate_evaluate`` result), the training round through :meth:`on_round`.
    """

    def __init__(self, run_folder: Path, cfg: ExperimentConfig, grid: MeteredGrid,
                 resume: ResumePoint | None = None, saliency: Any = None, global_state: Any = None) -> None:
        self.folder = Path(run_folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if resume is None:
            (self.folder / "config.yaml").write_text(cfg.to_yaml())
        self.cfg = cfg
        self.grid = grid
        self.offset = resume.round if resume else 0
        self.board = RunBoard(self.folder / "tensorboard", purge_step=self.offset + 1 if resume else None)
        self.server = self.board.server
        # Each round's console line (fedpanfm/console.py), completed by the probe's AUROC.
        self.lines = RoundLines(cfg.federation.rounds, probing=bool(cfg.evaluation.server_cohort))
        # Probe AUROC on the server's labelled validation cohort, off the round's critical path.
        self.probe = ServerProbe.from_config(cfg, self.server, on_result=self.lines.probe_result)
        self.pictures = RoundPictures(cfg, self.server, self.probe.batches if self.probe is not None else None)
        if resume is None:
            self.server.layout(federation_layout(self.pictures.organs))
        self._moved = 0.0  # bytes sent + received up to the last round
        self.checkpoints = CheckpointPolicy(self.folder / "checkpoints", cfg)
        self.report: RoundReport | None = None
        srv = resume.server if resume is not None else {}
        self.summary = RunSummary(self.folder, resume.round if resume else None, srv.get("history"),
                                  srv.get("failures"), srv.get("site_steps"))
        if resume is not None:
            self.checkpoints.restore(resume.round, srv.get("best_round"), srv.get("best_loss"))
        self._saliency = saliency
        self._global_state = global_state
        self.evaluation: EvaluationReport | None = None
        self.accountant = accountant(cfg)
        self._t_round = time.perf_counter()

    def on_round(self, report: RoundReport) -> None:
        """Strategy hook after aggregation: keep the report; write the sites' training scalars."""
        self.report = report
        self.summary.count_failures(report.failures)
        self.summary.count_steps(report.site_metrics)
        for name, values in report.site_metrics.items():
            # The "train/" prefix the server uses for the site means, so the curves overlay.
            self.board.write(self.board.site(name).scalars, {f"train/{k}": v for k, v in values.items()},
                             report.server_round)
        for name, norms in report.update_norms.items():
            self.board.write(RoundPictures.update_norms, self.board.site(name), norms, report.server_round)

    def on_evaluate(self, report: EvaluationReport) -> None:
        """Strategy hook after ``aggregate_evaluate``: keep the round's checked validation."""
        self.evaluation = report

    def after_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """``evaluate_fn`` of ``strategy.start``: called after each round's evaluation (and
        once before round 1, where only the start time is taken)."""
        if server_round == 0:
            if self.probe is not None and self.offset == 0:
                # Round 0, the initial weights: what the console's AUROC change is measured from.
                self.probe.submit(0, arrayrecord_to_state(arrays, "initial global arrays"))
            self._t_round = time.perf_counter()
            return None
        spans = SpanTimer()
        ev_report = self.evaluation if self.evaluation and self.evaluation.server_round == server_round else None
        evaluated: dict[str, SiteEvaluation] = ev_report.evaluations if ev_report else {}
        val: dict[str, float] = dict(ev_report.metrics) if ev_report else {}
        self.summary.count_failures(ev_report.failures if ev_report else {})
        for name, ev in evaluated.items():
            self.board.write(self.board.site(name).scalars, ev.metrics, server_round)
        now = time.perf_counter()
        fresh = self.report if self.report and self.report.server_round == server_round else None
        scalars = {
            **(fresh.metrics if fresh else {}),
            **val,
            "time/round_s": now - self._t_round,
            "bytes/sent_total": float(self.grid.bytes_sent),
            "bytes/received_total": float(self.grid.bytes_received),
            "memory/rss_mb": rss_mb(),
            "attempts": float(fresh.attempts if fresh else 1),
            **{f"failures/{site}": float(n) for site, n in self.summary.failures.items()},
        }
        if self.accountant is not None:
            eps = self.accountant.epsilon(server_round)
            log.info("round %d: differential privacy epsilon %.4g at delta %g%s", server_round, eps,
                     self.cfg.federation.dp.delta,
                     f" (budget {self.cfg.federation.dp.max_epsilon:g})" if self.cfg.federation.dp.max_epsilon else "")
            if math.isfinite(eps):  # no noise: no finite guarantee (TensorBoard takes finite values)
                scalars["dp/epsilon"] = eps
        self._t_round = now
        spans.mark("record")  # validation means, RSS probe
        self.board.write(self.server.scalars, scalars, server_round)
        self.board.flush()
        spans.mark("tensorboard")
        self.summary.history.append({"round": server_round, **scalars})
        moved = float(self.grid.bytes_sent + self.grid.bytes_received)
        self.lines.status(round_status(server_round, self.lines.last, scalars, fresh, self.pictures.organs,
                                       moved - self._moved))
        self._moved = moved
        # The strategy's tensors are the arrays before encoding (never written in place).
        held = self._global_state() if self._global_state is not None else None
        state = dict(held) if held is not None else arrayrecord_to_state(arrays, f"global arrays of round {server_round}")
        spans.mark("decode_global")
        if self.probe is not None:
            self.probe.submit(server_round, state)
        spans.mark("probe_submit")
        loss = val.get(VAL_LOSS)
        best: tuple[int | None, float | None]
        if loss is not None and math.isfinite(loss) and loss < self.checkpoints.best_loss:
            best = (server_round, float(loss))
        else:
            best = (self.checkpoints.best_round, self.checkpoints.best_loss if self.checkpoints.best_round else None)
        saliency = self._saliency() if self._saliency is not None else torch.zeros(0)
        self.board.write(self.pictures.draw, server_round, dict(scalars), saliency.detach().clone())
        self.checkpoints.submit(server_round, state, loss, {
            "sites": sorted(evaluated) or sorted(self.report.site_metrics if self.report else []),
            SERVER: server_state(server_round, saliency, best[0], best[1], list(self.summary.history),
                                 self.summary.failures, site_steps=self.summary.site_steps),
        })
        spans.mark("checkpoint_submit")
        # This hook's own spans (seconds), in the round's step.
        self.board.write(self.server.scalars, spans.tagged("time/server/"), server_round)
        self.board.write(self.server.flush)
        # The round's checkpoint is on disk before the next round starts; a failed write stops here.
        self.checkpoints.wait_round(server_round, self.summary.resume_command)
        return MetricRecord(dict(val)) if val else None

    def finish(self) -> dict[str, Any]:
        """Wait for the checkpoint writes, record hyper-parameters, close the logs; the summary."""
        failed_write = self.board.stop()
        self.checkpoints.close()
        if self.probe is not None:
            # A failed evaluation is logged, never fatal: the trained model matters more.
            self.probe.close(raise_errors=False)
        self.lines.flush()
        last = self.summary.history[-1] if self.summary.history else {}
        final = {f"final/{k}": v for k, v in last.items() if k.startswith(("train/loss", "val/loss"))}
        probed = {r: v for r, v in sorted(self.lines.auroc.items()) if v is not None}
        last_probe = max(probed, default=None)
        if last_probe is not None:
            final["final/probe_auroc_macro"] = probed[last_probe]
            if last_probe > 0 and 0 in probed:
                final["final/probe_auroc_change"] = probed[last_probe] - probed[0]
        self.board.close(_flat_hparams(self.cfg), final)
        dp = self.cfg.federation.dp
        summary = self.summary.write(
            sites=list(self.board.sites), tensorboard=self.board.dir,
            best_round=self.checkpoints.best_round, best_loss=self.checkpoints.best_loss,
            dp_epsilon=self.accountant.epsilon(len(self.summary.history)) if self.accountant is not None else None,
            dp_delta=dp.delta if dp.enabled else None,
            dp_max_epsilon=dp.max_epsilon if dp.enabled and dp.max_epsilon > 0 else None,
            probe_auroc=probed)
        if failed_write is not None:
            raise failed_write
        return summary


def rss_mb() -> float:
    """This process's resident memory in MiB (Linux ``/proc``; 0 where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


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
    """``<cfg.logging.run_dir>/<cfg.name>-federation-<YYYYmmdd-HHMMSS>`` (fedpanfm/run_folder.py)."""
    return named_run_folder(cfg.logging.run_dir, cfg.name, "federation")


def _in_simulation(grid: Grid) -> bool:
    """Whether ``grid`` is the simulation runtime's in-memory Grid (else a deployment's)."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid)


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

    if not _in_simulation(grid) or ray.is_initialized():
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
            ``run-folder`` (where to write; "" or absent: a new time-stamped folder) and
            ``resume`` (a run folder: continue it after its last complete round, with the
            config it stored; ``run-folder`` is then ignored).

    Raises:
        RoundFailed: a round got fewer than ``min_sites`` usable updates after its retries;
            the summary (``stopped``) and the previous round's checkpoint are written first.
    """
    import ray

    resume: ResumePoint | None = None
    if run_config.get("resume"):
        folder = Path(str(run_config["resume"]))
        resume = find_resume_point(folder)
        cfg = config_from_dict(resume_config(folder, resume), f"{resume.path / 'config.yaml'} (checksummed)")
        log.info("resuming %s after round %d (%s)", folder, resume.round, resume.path)
    else:
        cfg = config_from_run_config(run_config)
        if not _in_simulation(grid):
            # `federation run` checks this before it submits; a raw `flwr run` reaches here unchecked,
            # and every site would refuse the experiment in round 1 anyway.
            check_sites_accept(cfg, "the run config")
        folder = Path(str(run_config.get("run-folder") or "")) if run_config.get("run-folder") else new_run_folder(cfg)
    if cfg.federation.ray.enabled:
        await_simulation_ray(grid)
    had_ray = ray.is_initialized()
    aggregator = make_aggregator(cfg)
    metered = MeteredGrid(grid)
    strategy = FedPanFM(
        cfg, planned_steps(cfg), aggregator=aggregator,
        # Sites evaluate only when they hold out subjects.
        fraction_evaluate=1.0 if cfg.data.val_fraction > 0 else 0.0,
    )
    recorder = RunRecorder(folder, cfg, metered, resume, saliency=lambda: strategy.global_saliency,
                           global_state=lambda: strategy.global_state)
    strategy.on_round, strategy.on_evaluate = recorder.on_round, recorder.on_evaluate
    if not _in_simulation(grid):
        recorder.summary.resume_command = resume_command(folder, "")
    start = initial_state(cfg)
    if resume is not None:
        missing = sorted(set(start) ^ set(resume.state))
        if missing:
            raise ValueError(f"resume {resume.path}: its weights do not fit the config ({missing[0]!r} differs)")
        start = resume.state
        strategy.resume_from(resume.state, resume.saliency, resume.round)
    offset = recorder.offset
    last = cfg.federation.rounds
    if recorder.accountant is not None:
        # Epsilon is a function of the rounds released (accounting.py), so the last round the
        # budget allows is known now; the run ends cleanly after it, its checkpoint the final one.
        last = recorder.accountant.rounds_within_budget(cfg.federation.rounds)
        if last < cfg.federation.rounds:
            recorder.summary.budget_stop = (
                f"privacy budget: federation.dp.max_epsilon = {cfg.federation.dp.max_epsilon:g} allows {last} of "
                f"{cfg.federation.rounds} rounds (round {last + 1} would reach epsilon "
                f"{recorder.accountant.epsilon(last + 1):.4g} at delta {cfg.federation.dp.delta:g})")
            log.warning("%s", recorder.summary.budget_stop)
    recorder.lines.last = last
    # Before round 1: every site's cohort statistics, aggregates only (orchestration/cohort_statistics.py).
    statistics_round(metered, cfg, folder, recorder.server)
    ROUNDS.info("fedpanfm run %s: rounds %d..%d, writing to %s", cfg.name, offset + 1, last, folder,
                extra={"round_plan": (offset, last)})
    try:
        if offset < last:
            strategy.start(
                grid=metered,  # type: ignore[arg-type]  # duck-typed Grid (delegates to Flower's)
                initial_arrays=state_to_arrayrecord(start),
                num_rounds=last - offset,
                timeout=cfg.federation.round_timeout_s,
                evaluate_fn=lambda r, arrays: recorder.after_round(r + offset if r else 0, arrays),
            )
    except Exception as exc:
        recorder.summary.stopped = f"{type(exc).__name__}: {exc}"
        log.error("fedpanfm run %s stopped: %s\n  resume with: %s", cfg.name, exc, recorder.summary.resume_command)
        raise
    finally:
        summary = recorder.finish()
        if not had_ray and ray.is_initialized():
            ray.shutdown()  # we started it (deployment): leave nothing behind
    log.info("%s\n  summary: %s", summary_text(summary), folder / "summary.json")
    return summary


def build_server_app(run_config: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp running :func:`run_federation`.

    Args:
        run_config: the run config to use instead of the context's (in-process simulation,
            where Flower passes none); None reads ``context.run_config``.
    """
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        resolved = run_config if run_config is not None else context.run_config
        if _in_simulation(grid):  # `fedpanfm simulate` prepared the run folder and the logs
            run_federation(grid, resolved)
            return
        # Deployed: run.log, environment.json and our lines in the run's log stream.
        with deployed_run(resolved, context.run_id) as prepared:
            run_federation(grid, prepared)

    return server


app = build_server_app()

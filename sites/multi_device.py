"""A site's local training step on several devices: one process per device, started and supervised here.

A site whose node has N > 1 devices (``train.devices_per_site``, or the node config's
``train-devices``) trains each round with DeepSpeed data parallelism: :func:`fit_on_devices`
writes the step's inputs to a private folder (mode 0700), starts N rank processes
(``python -m sites.multi_device FOLDER RANK``) that meet through a ``FileStore`` there (no
port), and waits. Each rank loads its slice of every global batch
(``fedpanfm.train.data_parallel``), DeepSpeed all-reduces the gradients (gloo on CPU, NCCL on
CUDA, ZeRO stage 0-2), and rank 0 writes the site's new state and fit result back.

Supervision: a rank that exits with an error, or dies, fails the whole step with an error
naming the rank, its exit status and the end of its log; the other ranks are stopped (their
process groups, SIGTERM then SIGKILL) and the folder is removed, whatever happened. On Linux
each rank also dies with the thread that started it (``PR_SET_PDEATHSIG``), so a crashed site
process leaves no rank behind.

Each step starts fresh processes (torch and DeepSpeed imports plus an engine build per round,
seconds); keeping the ranks alive across rounds is future work (docs/scale-out.md).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedpanfm.config import ExperimentConfig, config_from_dict

log = logging.getLogger(__name__)

#: Node config key: this site's device count, over ``train.devices_per_site``.
NODE_DEVICES = "train-devices"
_POLL_S = 0.1
_LOG_TAIL_LINES = 15


class RankFailed(RuntimeError):
    """A rank of a site's data-parallel step failed; the message names it."""


def site_devices(cfg: ExperimentConfig, node_config: Mapping[str, Any]) -> int:
    """The number of devices (data-parallel ranks) this site trains on.

    Args:
        cfg: the experiment config (``train.devices_per_site``, ``device``, ``data.batch_size``).
        node_config: the site's node config; ``train-devices`` overrides the config's count.

    Raises:
        ValueError: naming the key, for a count below 1, one the batch does not split into,
            or more CUDA devices than this process sees.
    """
    key = NODE_DEVICES if NODE_DEVICES in node_config else "train.devices_per_site"
    raw = node_config.get(NODE_DEVICES, cfg.train.devices_per_site)
    try:
        devices = int(str(raw))
    except ValueError:
        raise ValueError(f"{key} = {raw!r}: expected a whole number of devices >= 1") from None
    if devices < 1:
        raise ValueError(f"{key} = {devices}: a site trains on at least 1 device")
    if devices > 1:
        if cfg.data.batch_size % devices:
            raise ValueError(f"{key} = {devices}: data.batch_size = {cfg.data.batch_size} must be a multiple of it "
                             "(each device takes an equal share of the site's batch)")
        from fedpanfm.train.distributed import pick_device

        if pick_device(cfg.device).type == "cuda" and torch.cuda.device_count() < devices:
            raise ValueError(f"{key} = {devices}, but this process sees {torch.cuda.device_count()} CUDA device(s) "
                             "(CUDA_VISIBLE_DEVICES; in simulation federation.ray.site_gpus is at most 1)")
    return devices


@dataclass
class DeviceFit:
    """What the ranks' step produced (rank 0's copy; every rank holds the same).

    Args:
        result: the site's fit result over all ranks.
        state: the model state after the step (``LocalTrainer.export_state``).
        schedule: ``LocalTrainer.schedule_state`` after the step.
    """

    result: Any  # fedpanfm.train.engine.FitResult (imported lazily: torch-heavy)
    state: dict[str, torch.Tensor]
    schedule: dict[str, int]


def fit_on_devices(
    cfg: ExperimentConfig,
    site: Any,
    state: dict[str, torch.Tensor],
    position: dict[str, int],
    round_seed: int,
    seed: int,
    global_saliency: torch.Tensor,
    devices: int,
    timeout_s: float | None = None,
    on_start: Callable[[list[int]], None] | None = None,
) -> DeviceFit:
    """Run one local training step of ``site`` on ``devices`` rank processes.

    Args:
        cfg: the experiment config.
        site: the site (``sites.runtime.SiteRuntime``): name, folder and training subjects.
        state: the weights to start from (global weights with the site's own tensors over them).
        position: the schedule state to continue (``SiteRuntime.schedule_position``).
        round_seed: the loader's shuffle seed offset (the round).
        seed: the step's RNG seed (the world-size-1 path's ``torch.manual_seed`` value).
        global_saliency: (n_organs,) the federation's saliency for SGM.
        devices: ranks to start (> 1).
        timeout_s: stop the ranks and raise after this long (None: ``federation.round_timeout_s``).
        on_start: called with the ranks' PIDs once all are started (logging, tests).

    Raises:
        RankFailed: a rank exited with an error or was killed; no rank is left running.
        TimeoutError: the step took longer than ``timeout_s``; no rank is left running.
    """
    if devices < 2:
        raise ValueError(f"fit_on_devices: devices = {devices}; one device trains in-process")
    timeout = cfg.federation.round_timeout_s if timeout_s is None else timeout_s
    job_dir = Path(tempfile.mkdtemp(prefix="fedpanfm-dp-"))  # mode 0700
    procs: list[subprocess.Popen[bytes]] = []
    try:
        job = {"config": cfg.to_dict(), "world_size": devices, "site": site.name, "site_dir": str(site.site_dir),
               "train_ids": list(site.train_ids), "round_seed": round_seed, "seed": seed, "position": dict(position)}
        (job_dir / "job.json").write_text(json.dumps(job))
        torch.save({"state": state, "saliency": global_saliency.detach().float().cpu()}, job_dir / "inputs.pt")
        env = _rank_env()
        for rank in range(devices):
            with open(job_dir / f"rank{rank}.log", "wb") as out:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "sites.multi_device", str(job_dir), str(rank)],
                    stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                    preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
                ))
        log.info("site %s: training on %d devices, rank pids %s", site.name, devices, [p.pid for p in procs])
        if on_start is not None:
            on_start([p.pid for p in procs])
        _supervise(procs, job_dir, site.name, timeout)
        out = torch.load(job_dir / "result.pt", weights_only=True)
    finally:
        _stop(procs)
        shutil.rmtree(job_dir, ignore_errors=True)
    from fedpanfm.train.engine import FitResult

    return DeviceFit(result=FitResult(**out["fit"]), state=out["state"], schedule=out["schedule"])


def _rank_env() -> dict[str, str]:
    env = dict(os.environ)
    # The ranks set their own rank variables; the parent's world-size-1 defaults must not leak.
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    # `python -m sites.multi_device` from wherever the site runs (a Ray actor's working folder).
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _die_with_parent() -> None:
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _log_tail(job_dir: Path, rank: int) -> str:
    try:
        lines = (job_dir / f"rank{rank}.log").read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-_LOG_TAIL_LINES:]) or "(empty log)"


def _supervise(procs: list[subprocess.Popen[bytes]], job_dir: Path, site: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]
        failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            # Every rank seen failing in this sweep is named (a rank's error often breaks the
            # others' collectives); the log quoted is the lowest failed rank's.
            rank, code = failed[0]
            others = "".join(f"; rank {r} {_exit_text(c)}" for r, c in failed[1:])
            raise RankFailed(f"site {site}: data-parallel rank {rank} of {len(procs)} {_exit_text(code)}{others}; "
                             f"the local step failed and the other ranks were stopped. Rank {rank}'s log ends:\n"
                             f"{_log_tail(job_dir, rank)}")
        if all(c == 0 for c in codes):
            if not (job_dir / "result.pt").is_file():
                raise RankFailed(f"site {site}: every rank exited cleanly but rank 0 wrote no result")
            return
        if time.monotonic() > deadline:
            running = [r for r, c in enumerate(codes) if c is None]
            raise TimeoutError(f"site {site}: the data-parallel step ran past {timeout:.0f} s; ranks {running} were "
                               "still running and were stopped")
        time.sleep(_POLL_S)


def _stop(procs: list[subprocess.Popen[bytes]], grace_s: float = 5.0) -> None:
    """Stop every rank still running (its whole process group), SIGTERM first, then SIGKILL."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in live:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(p, signal.SIGKILL)
            p.wait()


def _signal_group(p: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(p.pid, sig)  # start_new_session: the rank leads its own group (its data workers too)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------------- rank side


def _rank_main(job_dir: Path, rank: int) -> None:
    """One rank: join the group, train its shards, and (rank 0) write the site's result."""
    job = json.loads((job_dir / "job.json").read_text())
    cfg = config_from_dict(job["config"], f"{job_dir}/job.json")
    world = int(job["world_size"])

    from fedpanfm.data.dataset import open_site_dataset
    from fedpanfm.train.distributed import init_rank_process, rank_device
    from sites.runtime import SiteRuntime

    # What can fail on bad input comes before the group and the engine, so it fails in seconds.
    site_dir = Path(job["site_dir"])
    site = SiteRuntime(cfg=cfg, name=job["site"], site_dir=site_dir, train_ids=list(job["train_ids"]), val_ids=[],
                       dataset=open_site_dataset(site_dir, cfg))
    inputs = torch.load(job_dir / "inputs.pt", weights_only=True)
    device = rank_device(cfg.device, rank)
    init_rank_process(device, rank, world, str(job_dir / "store"))

    import torch.distributed as dist

    from fedpanfm.train.data_parallel import ShardedLoader
    from fedpanfm.train.engine import LocalTrainer

    trainer = LocalTrainer(cfg, device=device)
    trainer.load_state(inputs["state"])
    trainer.reset_optimizer()
    trainer.set_schedule_state(job["position"])
    # Every rank seeds as the one-device path does: the trainer derives the step's draw seed from
    # it, and each draw is keyed by a subject's place in the global batch, not by the rank.
    torch.manual_seed(int(job["seed"]))
    loader = ShardedLoader(site.loader("train", round_seed=int(job["round_seed"])), rank, world)
    result = trainer.fit(loader, cfg.train.epochs, int(job["position"]["total_steps"]),
                         global_saliency=inputs["saliency"])
    if rank == 0:
        fit = {"metrics": result.metrics, "gate_mass": result.gate_mass, "organ_subjects": result.organ_subjects,
               "saliency": result.saliency, "subjects": result.subjects, "steps": result.steps,
               "seconds": result.seconds, "history": result.history}
        tmp = job_dir / "result.pt.tmp"
        torch.save({"fit": fit, "state": trainer.export_state(), "schedule": trainer.schedule_state()}, tmp)
        os.replace(tmp, job_dir / "result.pt")
    dist.barrier()  # no rank leaves (and tears the group down) before rank 0 has written
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        raise SystemExit("usage: python -m sites.multi_device JOB_FOLDER RANK (started by fit_on_devices)")
    logging.basicConfig(level=logging.WARNING, format=f"rank {args[1]}: %(levelname)s %(name)s: %(message)s")
    _rank_main(Path(args[0]), int(args[1]))


if __name__ == "__main__":
    main()

"""Run the whole federation on one machine: Flower's simulation runtime, in this process.

``simulate(config, overrides)`` generates the synthetic cohort when ``cfg.cohort`` does not
exist, then runs the same ServerApp and ClientApp that ``flwr run .`` runs, with
``cfg.synth.sites`` supernodes.

Why in-process (``flwr.simulation.run_simulation``) rather than spawning ``flwr run .``:
``flwr run`` against ``:local:`` starts a detached SuperLink on fixed ports that outlives the
command; on a shared machine parallel runs would collide on those ports, and a crash would
leave a server behind. In-process, everything stops with the call. The Python entry point does
not pass a run config to the apps, so we build them with the run config they would read from
``pyproject.toml`` (``build_server_app`` / ``build_client_app``).

Ray: we start it here, before Flower does, so that the client actors and the server's
aggregation tasks share one Ray with known resources: one CPU per client actor (so at most
``cpu_count`` sites train at once), aggregation and background tasks ask for ``num_cpus=0``
(they would otherwise wait forever behind the actors).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import time
from pathlib import Path
from typing import Any

from fedpanfm.config import ExperimentConfig, load_config

log = logging.getLogger(__name__)


def ensure_cohort(cfg: ExperimentConfig) -> Path:
    """The cohort folder, generated with the synthetic generator when it does not exist.

    Args:
        cfg: the experiment config (``cohort``, ``synth``).
    """
    from fedpanfm.data.synthetic import generate_cohort

    cohort = Path(cfg.cohort)
    if not cohort.exists():
        t0 = time.perf_counter()
        sites = generate_cohort(cohort, cfg)
        log.info("generated synthetic cohort %s (%d sites) in %.1f s", cohort, len(sites), time.perf_counter() - t0)
    return cohort


def simulate(config: str | Path | None, overrides: list[str] | None = None, run_folder: Path | None = None,
             cpus: int | None = None, resume: Path | None = None) -> dict[str, Any]:
    """Run the federation in simulation; returns the run summary the ServerApp wrote.

    Args:
        config: the experiment YAML (ignored with ``resume``: the run's own ``config.yaml``).
        overrides: ``KEY=VALUE`` config overrides (as ``--set`` takes them; not with ``resume``).
        run_folder: where the run writes; a new ``<run_dir>/<name>-<timestamp>`` when None.
        cpus: CPUs Ray may use (one per concurrently training site); ``os.cpu_count()`` when None.
        resume: a run folder to continue after its last complete round (docs/reliability.md).

    Raises:
        RuntimeError: the run stopped before its last round (the summary says why; resume it).
    """
    import ray
    from flwr.simulation import run_simulation

    from orchestration.server_app import build_server_app, new_run_folder
    from sites.client_app import build_client_app

    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    overrides = list(overrides or [])
    if resume is not None:
        if overrides:
            raise ValueError("simulate --resume: the run continues with its stored config; drop the overrides")
        run_folder = Path(resume)
        config = run_folder / "config.yaml"
        if not config.is_file():
            raise FileNotFoundError(f"simulate --resume {run_folder}: no config.yaml (not a run folder)")
    if config is None:
        raise ValueError("simulate: name a config (or --resume a run folder)")
    cfg = load_config(config, overrides)
    ensure_cohort(cfg)
    run_folder = Path(run_folder) if run_folder is not None else new_run_folder(cfg)
    run_config = {
        "config": str(Path(config).resolve()),
        "overrides": shlex.join(overrides),
        "run-folder": str(run_folder.resolve()),
        "resume": str(run_folder.resolve()) if resume is not None else "",
    }
    started_ray = False
    if not ray.is_initialized():
        ray.init(num_cpus=cpus or os.cpu_count() or 1, include_dashboard=False, logging_level=logging.WARNING)
        started_ray = True
    try:
        run_simulation(
            server_app=build_server_app(run_config),
            client_app=build_client_app(run_config),
            num_supernodes=cfg.synth.sites,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        )
    finally:
        if started_ray:
            ray.shutdown()
    summary_path = run_folder / "summary.json"
    if not summary_path.is_file():
        raise RuntimeError(f"simulation ended without a summary: {summary_path} is missing (see the log above)")
    summary = json.loads(summary_path.read_text())
    if summary.get("stopped"):
        raise RuntimeError(f"simulation stopped: {summary['stopped']}\n  resume with: fedpanfm simulate --resume {run_folder}")
    return summary

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
from collections.abc import Callable, Mapping
from typing import Any

from fedpanfm.config import ExperimentConfig, load_config

log = logging.getLogger(__name__)

#: The file the synthetic generator writes at the top of a cohort it made.
SYNTHETIC_MARK = "cohort_metadata.json"


def ensure_cohort(cfg: ExperimentConfig) -> Path:
    """The cohort folder, generated with the synthetic generator when it does not exist; and
    the server's labelled probe cohort (``evaluation.server_cohort``) when it is missing and the
    training cohort is synthetic: full-body sites from ``evaluation.study.eval_seed``
    (:func:`~fedpanfm.evaluation.study.eval_cohort_config`), so no site trains on its subjects.

    Args:
        cfg: the experiment config (``cohort``, ``synth``, ``evaluation``).
    """
    from fedpanfm.data.synthetic import generate_cohort

    cohort = Path(cfg.cohort)
    if not cohort.exists():
        t0 = time.perf_counter()
        sites = generate_cohort(cohort, cfg)
        log.info("generated synthetic cohort %s (%d sites) in %.1f s", cohort, len(sites), time.perf_counter() - t0)
    probe = Path(cfg.evaluation.server_cohort) if cfg.evaluation.server_cohort else None
    if probe is not None and not probe.exists() and (cohort / SYNTHETIC_MARK).is_file():
        from fedpanfm.evaluation.study import eval_cohort_config

        t0 = time.perf_counter()
        sites = generate_cohort(probe, eval_cohort_config(cfg))
        log.info("generated the server's labelled probe cohort %s (%d sites) in %.1f s", probe, len(sites),
                 time.perf_counter() - t0)
    return cohort


def simulate(config: str | Path | None, overrides: list[str] | None = None, run_folder: Path | None = None,
             cpus: int | None = None, resume: Path | None = None,
             client_app: Callable[[Mapping[str, Any]], Any] | None = None) -> dict[str, Any]:
    """Run the federation in simulation; returns the run summary the ServerApp wrote.

    Args:
        config: the experiment YAML (ignored with ``resume``: the run's own ``config.yaml``).
        overrides: ``KEY=VALUE`` config overrides (as ``--set`` takes them; not with ``resume``).
        run_folder: where the run writes; a new ``<run_dir>/<name>-simulate-<timestamp>`` when None
            (fedpanfm/run_folder.py). It gets ``run.log``, ``command.txt``, ``environment.json``.
        cpus: CPUs Ray may use (one per concurrently training site); ``os.cpu_count()`` when None.
        resume: a run folder to continue after its last complete round (docs/reliability.md).
        client_app: builds the sites' ClientApp from the run config instead of
            ``sites.client_app.build_client_app`` (the malicious-site tests swap in an attacker).

    Raises:
        RuntimeError: the run stopped before its last round (the summary says why; resume it).
    """
    import ray
    from flwr.simulation import run_simulation

    from fedpanfm.run_folder import new_run_folder, record_provenance
    from fedpanfm.run_log import run_log_file
    from orchestration.log_routing import routed_logs
    from orchestration.server_app import build_server_app
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
    run_folder = Path(run_folder) if run_folder is not None else new_run_folder(cfg.logging.run_dir, cfg.name, "simulate")
    run_config = {
        "config": str(Path(config).resolve()),
        "overrides": shlex.join(overrides),
        "run-folder": str(run_folder.resolve()),
        "resume": str(run_folder.resolve()) if resume is not None else "",
    }
    # Everything from here, Flower's, Ray's and the sites' lines included, goes to run.log once.
    with run_log_file(run_folder):
        record_provenance(run_folder, cfg.device)
        ensure_cohort(cfg)
        started_ray = False
        if not ray.is_initialized():
            ray.init(num_cpus=cpus or os.cpu_count() or 1, include_dashboard=False, logging_level=logging.WARNING)
            started_ray = True
        try:
            with routed_logs():
                run_simulation(
                    server_app=build_server_app(run_config),
                    client_app=(client_app or build_client_app)(run_config),
                    num_supernodes=cfg.synth.sites,
                    backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
                )
        finally:
            if started_ray:
                ray.shutdown()
    summary_path = run_folder / "summary.json"
    if not summary_path.is_file():
        raise RuntimeError(f"simulation ended without a summary: {summary_path} is missing (see {run_folder / 'run.log'})")
    summary = json.loads(summary_path.read_text())
    if summary.get("stopped"):
        raise RuntimeError(f"simulation stopped: {summary['stopped']}\n  resume with: fedpanfm simulate --resume {run_folder}")
    return summary

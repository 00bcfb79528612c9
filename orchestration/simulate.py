"""Run the whole federation on one machine: Flower's simulation runtime, in this process.

``simulate(config, overrides)`` generates the synthetic cohort when ``cfg.cohort`` does not
exist, then runs the same ServerApp and ClientApp that ``flwr run .`` runs, with
``cfg.synth.sites`` supernodes.

Why in-process (``flwr.simulation.run_simulation``) rather than spawning ``flwr run .``:
``flwr run`` against ``:local:`` starts a detached SuperLink on fixed ports that outlives the
command; on a shared machine parallel runs would collide on those ports, and a crash would
leave a server behind. In-process, everything stops with the call. The Python entry point does
not pass a run config to the apps, so we load the apps ``pyproject.toml``
``[tool.flwr.app.components]`` names (as ``flwr run`` does) and wrap them to see the run config
they would read there (``orchestration/app_components.py``); this module never imports ``sites``.

Ray: we start or join it here, before Flower does, so that the client actors and the server's
aggregation tasks share one Ray (``orchestration/ray_cluster.py``): a private local Ray by
default, or the cluster ``federation.ray.address`` / ``--ray-address`` names. Each site actor
reserves ``federation.ray.site_cpus`` CPUs and ``site_gpus`` GPUs, so at most (cluster CPUs /
site_cpus) sites train at once, across all the cluster's nodes; aggregation tasks ask for
``num_cpus=0`` (they would otherwise wait forever behind the actors). On a cluster the cohort
path is made absolute and checked (or generated, when synthetic) on every node first, and the
run records which node and device hosted each site and aggregation (``orchestration/placement.py``:
``summary.json`` ``placement``, TensorBoard ``placement``). docs/scale-out.md has the recipes.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpanfm.config import ExperimentConfig, load_config
from fedpanfm.federation.site_allowlist import refusal, refused_settings
from orchestration.ray_cluster import SYNTHETIC_MARK

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp

log = logging.getLogger(__name__)


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
             client_app: Callable[[Mapping[str, Any]], ClientApp] | None = None,
             ray_address: str | None = None) -> dict[str, Any]:
    """Run the federation in simulation; returns the run summary the ServerApp wrote.

    Args:
        config: the experiment YAML (ignored with ``resume``: the run's own ``config.yaml``).
        overrides: ``KEY=VALUE`` config overrides (as ``--set`` takes them; not with ``resume``).
        run_folder: where the run writes; a new ``<run_dir>/<name>-simulate-<timestamp>`` when None
            (fedpanfm/run_folder.py). It gets ``run.log``, ``command.txt``, ``environment.json``.
        cpus: CPUs of the private local Ray (sites training at once = cpus / site_cpus);
            ``os.cpu_count()`` when None; not with a cluster address.
        resume: a run folder to continue after its last complete round (docs/reliability.md).
        client_app: builds the sites' ClientApp from the run config instead of the
            ``clientapp`` component of ``pyproject.toml`` (the malicious-site tests swap in an
            attacker).
        ray_address: the Ray to run on instead of ``federation.ray.address`` ("" a private local
            Ray; ``auto``, ``host:port``, ``ray://host:port`` a cluster); None: the config's.

    Raises:
        RuntimeError: the run stopped before its last round (the summary says why; resume it).
    """
    import ray
    from flwr.simulation import run_simulation

    from fedpanfm.run_folder import new_run_folder, record_provenance
    from fedpanfm.run_log import run_log_file
    from orchestration.app_components import client_with_run_config, load_component, server_with_run_config
    from orchestration.log_routing import routed_logs
    from orchestration.placement import PlacementLog, placed_client_app, write_tensorboard
    from orchestration.ray_cluster import prepare_nodes, ray_session, site_resources

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
    refused = refused_settings(cfg)
    if refused:
        # Simulated sites take the config as it is; deployed ones would refuse it (docs/deployment.md).
        log.warning("%s: simulated sites use it as it is, but every deployed site would refuse it: %s", config,
                    refusal(*refused[0]))
    address = cfg.federation.ray.address if ray_address is None else ray_address
    run_folder = Path(run_folder) if run_folder is not None else new_run_folder(cfg.logging.run_dir, cfg.name, "simulate")
    site_overrides = list(overrides)
    if address and not Path(cfg.cohort).is_absolute():
        # Sites on other nodes have working folders of their own: they get the path the server sees.
        site_overrides.append(f"cohort={Path(cfg.cohort).resolve()}")
        cfg = load_config(config, site_overrides)
    run_config = {
        "config": str(Path(config).resolve()),
        "overrides": shlex.join(site_overrides),
        "run-folder": str(run_folder.resolve()),
        "resume": str(run_folder.resolve()) if resume is not None else "",
    }
    placement = PlacementLog()
    # Everything from here, Flower's, Ray's and the sites' lines included, goes to run.log once.
    with run_log_file(run_folder):
        record_provenance(run_folder, cfg.device)
        ensure_cohort(cfg)
        with ray_session(address, cpus):
            nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
            resources = site_resources(cfg, nodes)
            if address:
                prepare_nodes(cfg)
            log.info("Ray: %d node(s); each site actor reserves %g CPU(s) and %g GPU(s)", len(nodes),
                     resources["num_cpus"], resources["num_gpus"])
            with routed_logs(), placement.recording():
                sites_app = (client_app(run_config) if client_app is not None
                             else client_with_run_config(load_component("clientapp"), run_config))
                run_simulation(
                    server_app=server_with_run_config(load_component("serverapp"), run_config),
                    client_app=placed_client_app(sites_app, placement.name, cfg.device),
                    num_supernodes=cfg.synth.sites,
                    backend_config={"client_resources": {**resources}},
                )
    summary_path = run_folder / "summary.json"
    if not summary_path.is_file():
        raise RuntimeError(f"simulation ended without a summary: {summary_path} is missing (see {run_folder / 'run.log'})")
    summary = json.loads(summary_path.read_text())
    # Where each site and aggregation ran, beside what the ServerApp wrote (docs/scale-out.md).
    summary["placement"] = placement.summary()
    summary_path.write_text(json.dumps(summary, indent=2))
    if summary.get("tensorboard"):
        write_tensorboard(Path(summary["tensorboard"]), summary["placement"])
    if summary.get("stopped"):
        raise RuntimeError(f"simulation stopped: {summary['stopped']}\n  resume with: fedpanfm simulate --resume {run_folder}")
    return summary

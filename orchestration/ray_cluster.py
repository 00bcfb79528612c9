"""Which Ray a federation runs on, what each site's actor reserves there, and the cohort on every node.

``federation.ray.address`` (or ``fedpanfm simulate --ray-address``) chooses the Ray:

- ``""`` (the default): a *private* local Ray, started with ``ray.init(address="local")`` in a
  temporary folder of its own. Ray's own default (``ray.init()`` with no address) would join
  whatever cluster is discoverable, i.e. ``RAY_ADDRESS`` or the address file the last
  ``ray start`` left in ``/tmp/ray/ray_current_cluster``, and then reject the resource
  arguments a local run passes ("When connecting to an existing cluster, num_cpus and num_gpus
  must not be provided"): a quickstart would break on any machine where ``ray start`` was ever
  run. A discoverable cluster that was not asked for is logged, with how to use it.
- ``auto``, ``host:port`` or ``ray://host:port``: join that cluster, with no resource
  arguments (the cluster's nodes declare their own).

Our design choices:

- Site actors reserve ``federation.ray.site_cpus`` CPUs and ``site_gpus`` GPUs
  (:func:`site_resources`). Flower fills every node with as many actors as its CPUs (and GPUs)
  allow, so the sites are placed across the cluster's nodes by these resource settings, not by
  a scheduling strategy (Flower 1.41's backend config passes numbers only). Fractional GPUs are
  restricted to 1/k (checked with the config) so that Flower's per-node actor count (GPUs /
  fraction) is exactly what Ray can pack on each device.
- The cohort must be readable at the same absolute path on every node that may host a site
  (:func:`prepare_nodes`): a synthetic cohort missing on a node is generated there (the
  generator is deterministic: byte-identical for the same config) and every node's manifests
  are compared with the server's; a real cohort must be on shared storage (or copied to the
  same path on every node).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from fedpanfm.config import ConfigError, ExperimentConfig

log = logging.getLogger(__name__)

#: The file the synthetic generator writes at the top of a cohort it made.
SYNTHETIC_MARK = "cohort_metadata.json"


def discoverable_cluster() -> str | None:
    """The address ``ray.init()`` with no address would join, if any: ``RAY_ADDRESS``, else the
    address file of the last ``ray start`` on this machine (whether or not that Ray still runs)."""
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env:
        return f"{env} (RAY_ADDRESS)"
    try:
        from ray._common.utils import get_ray_address_file  # where this Ray version keeps it

        path = Path(get_ray_address_file(None))
    except ImportError:
        path = Path("/tmp/ray/ray_current_cluster")
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return f"{text} ({path})" if text else None


def start_ray(address: str, num_cpus: int | None = None) -> Path | None:
    """Connect this process to Ray; returns the private temporary folder of a Ray it started.

    Args:
        address: "" starts a private local Ray; ``auto``, ``host:port`` or ``ray://...`` joins
            that cluster.
        num_cpus: CPUs of a private local Ray (None: all cores); must be None with an address.

    Raises:
        ValueError: ``num_cpus`` with a cluster address (a cluster declares its own resources).
    """
    import ray

    if address:
        if num_cpus is not None:
            raise ValueError(f"Ray cluster {address}: the cluster's nodes declare their CPUs; drop --cpus")
        ray.init(address=address, logging_level=logging.WARNING)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        log.info("joined the Ray cluster at %s: %d node(s), %s", address, len(nodes), _resources_text(ray.cluster_resources()))
        return None
    temp = Path(tempfile.mkdtemp(prefix="fedpanfm-ray-"))
    other = discoverable_cluster()
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
             logging_level=logging.WARNING, _temp_dir=str(temp))
    resources = _resources_text(ray.cluster_resources())
    if other:
        log.info("started a private local Ray (%s, %s); a Ray cluster is discoverable at %s but "
                 "federation.ray.address is '': to run there, set it (or --ray-address auto)", resources, temp, other)
    else:
        log.info("started a private local Ray (%s, %s)", resources, temp)
    return temp


def stop_ray(temp: Path | None) -> None:
    """Disconnect (a private Ray stops with it) and remove the private Ray's temporary folder."""
    import ray

    ray.shutdown()
    if temp is not None:
        shutil.rmtree(temp, ignore_errors=True)


@contextlib.contextmanager
def ray_session(address: str, num_cpus: int | None = None) -> Iterator[None]:
    """This process on Ray for the block: the Ray already running in it (left running), else
    :func:`start_ray` (stopped after the block)."""
    import ray

    if ray.is_initialized():
        if address:
            log.info("Ray already runs in this process; federation.ray.address %r is not used", address)
        yield
        return
    temp = start_ray(address, num_cpus)
    try:
        yield
    finally:
        stop_ray(temp)


def _resources_text(resources: Mapping[str, float]) -> str:
    gpus = resources.get("GPU", 0.0)
    return f"{resources.get('CPU', 0.0):g} CPUs" + (f", {gpus:g} GPUs" if gpus else "")


# --------------------------------------------------------------------------- site resources


def site_resources(cfg: ExperimentConfig, nodes: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The Ray resources of one site actor: ``{"num_cpus": c, "num_gpus": g}``.

    ``site_gpus = -1`` (auto): 0 with ``device: cpu`` or a cluster without GPUs; otherwise
    1/ceil(sites / GPUs), capped at 1, so that every site of the cohort trains at once on the
    cluster's GPUs.

    Args:
        cfg: ``federation.ray.site_cpus`` / ``site_gpus``, ``device``, ``synth.sites``.
        nodes: each alive node's resources (``ray.nodes()[i]["Resources"]``).

    Raises:
        ConfigError: GPUs asked for on a cluster without any, ``device: cuda`` with none, or a
            site larger than every node.
    """
    ray_cfg = cfg.federation.ray  # site_gpus is -1, 0, 1 or 1/k (fedpanfm/config.py validate)
    gpus = sum(float(n.get("GPU", 0.0)) for n in nodes)
    want = ray_cfg.site_gpus
    if want < 0:
        want = 0.0 if cfg.device == "cpu" or gpus < 1 else 1.0 / max(1, math.ceil(cfg.synth.sites / int(gpus)))
    if want > 0 and gpus <= 0:
        raise ConfigError(f"federation.ray.site_gpus = {want:g}, but the Ray cluster has no GPU")
    if want == 0 and cfg.device == "cuda":
        raise ConfigError("device: cuda, but the site actors get no GPU (federation.ray.site_gpus = 0, or no GPU in "
                          "the Ray cluster); Ray hides every GPU from an actor that reserved none")
    if want > 0 and cfg.device == "cpu":
        raise ConfigError(f"device: cpu with federation.ray.site_gpus = {want:g}: the sites would hold GPUs they "
                          "never use; set site_gpus to 0 (or -1) or device to auto")
    fits = [n for n in nodes if float(n.get("CPU", 0.0)) >= ray_cfg.site_cpus and float(n.get("GPU", 0.0)) >= want]
    if not fits:
        largest = max((float(n.get("CPU", 0.0)) for n in nodes), default=0.0)
        raise ConfigError(f"federation.ray.site_cpus = {ray_cfg.site_cpus:g}, site_gpus = {want:g}: no Ray node has "
                          f"that much (largest: {largest:g} CPUs), so no site could start")
    return {"num_cpus": float(ray_cfg.site_cpus), "num_gpus": float(want)}


# --------------------------------------------------------------------------- cohort on every node


def cohort_fingerprint(cohort: Path) -> str:
    """sha256 over the cohort's synthetic-generator record (if any) and every site's manifest:
    two nodes with the same fingerprint list the same subjects and files."""
    from fedpanfm.data.dataset import list_sites
    from fedpanfm.data.manifest import MANIFEST_NAME

    h = hashlib.sha256()
    mark = cohort / SYNTHETIC_MARK
    if mark.is_file():
        h.update(mark.read_bytes())
    for site in list_sites(cohort):
        h.update(site.name.encode() + b"\0" + (site / MANIFEST_NAME).read_bytes())
    return h.hexdigest()


def _cohort_here(cfg: ExperimentConfig, synthetic: bool) -> dict[str, str]:
    """On one node: the cohort's fingerprint, the synthetic cohort generated first if missing."""
    cohort = Path(cfg.cohort)
    if not cohort.exists() and synthetic:
        from fedpanfm.data.synthetic import generate_cohort

        # Beside the target, then renamed: another node on shared storage sees all of it or none.
        cohort.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{cohort.name}-", dir=cohort.parent))
        try:
            generate_cohort(staging, cfg)
            try:
                staging.rename(cohort)
            except OSError:
                if not cohort.is_dir():  # not "someone else made it meanwhile"
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if not cohort.is_dir():
        return {"host": socket.gethostname(), "error": f"cohort folder {cohort} not found"}
    return {"host": socket.gethostname(), "fingerprint": cohort_fingerprint(cohort)}


def prepare_nodes(cfg: ExperimentConfig) -> dict[str, str]:
    """Make sure every alive node with CPUs can read ``cfg.cohort`` (absolute) as the server does.

    A 0-CPU task per node (pinned there) reports the cohort's fingerprint, generating a missing
    synthetic cohort first. Returns node id -> host name.

    Raises:
        RuntimeError: naming the node (id and host) whose cohort is missing or differs.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cohort = Path(cfg.cohort)
    if not cohort.is_absolute():
        raise ValueError(f"prepare_nodes: cohort {cohort} must be an absolute path (nodes have their own working folders)")
    want = cohort_fingerprint(cohort)
    synthetic = (cohort / SYNTHETIC_MARK).is_file()
    task = ray.remote(num_cpus=0)(_cohort_here)
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    refs = {node: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(cfg, synthetic)
            for node in nodes}
    hosts: dict[str, str] = {}
    for node, ref in refs.items():
        got = ray.get(ref)
        hosts[node] = got["host"]
        where = f"Ray node {node[:12]} ({got['host']})"
        if "error" in got:
            raise RuntimeError(f"{where}: {got['error']}; a site may run on any node: put the cohort on storage "
                               "every node mounts at the same path (docs/scale-out.md)")
        if got["fingerprint"] != want:
            raise RuntimeError(f"{where}: cohort {cohort} differs from the server's (its manifests or generator "
                               "record differ); every node must read the same cohort")
    return hosts


__all__ = [
    "cohort_fingerprint",
    "discoverable_cluster",
    "prepare_nodes",
    "ray_session",
    "site_resources",
    "start_ray",
    "stop_ray",
]

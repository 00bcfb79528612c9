"""Where the server's aggregation runs: serially in the ServerApp process, or as Ray tasks.

Both aggregators run the same pure functions (``fedpanfm.federation.aggregate``): the round is
planned into per-parameter-group mean tasks, the tasks run (here: serially or on Ray), and the
result is finished (directors, teacher policy, metrics) in the calling process. The Ray path
therefore gives bit-identical results to the serial one.

Ray specifics:
- each site's state dict is ``ray.put`` once, packed as one flat array per dtype
  (``pack_state``), as soon as the strategy has decoded it (``RayAggregator.receive``) rather
  than when the round is aggregated; tasks read zero-copy views (``unpack_state``) and return
  their means packed the same way;
- groups nobody weighted stay in this process, and the previous global tensors travel only
  for experts a site left out;
- on a cluster the tasks run where their inputs live: the updates reach the server process
  through Flower's message path, so they are put into the server node's object store, and
  Ray's locality-aware scheduling runs the tasks beside them. Spreading them over other nodes
  would first copy every update across the network for memory-bound work that reads each
  byte once (docs/federation.md, "Execution");
- tasks take ``num_cpus=0``: in simulation the ClientApp actors hold every CPU, and a 1-CPU task
  would wait for one forever;
- the groups are packed into a few tasks (``max_tasks``, balanced by bytes) rather than one task
  per group: Ray may start a worker process per concurrent 0-CPU task, and each worker imports
  torch, which on a small machine costs more than the averaging itself.

Side work off the round's critical path (checkpoint writing, the server's probe, TensorBoard)
runs on threads of the server process, not as Ray tasks (``orchestration/checkpoints.py`` and
``server_eval.py`` say why).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Protocol

import numpy as np
import ray
import torch
from torch import Tensor

from fedpanfm.config import ExperimentConfig
from fedpanfm.federation.aggregate import aggregate_round
from fedpanfm.federation.directors import State
from fedpanfm.federation.means import MeanTask, RunMeans, run_means_serial
from fedpanfm.federation.outcome import RoundOutcome
from fedpanfm.federation.planning import RoundPlan
from fedpanfm.federation.protocol import SiteUpdate
from fedpanfm.federation.tensor_codec import state_nbytes
from orchestration.placement import note_aggregation
from orchestration.ray_cluster import start_ray


class Aggregator(Protocol):
    """Closes a round: global state + site updates -> new global state and outcome."""

    def receive(self, update: SiteUpdate, round_sites: int) -> None: ...

    def aggregate(
        self,
        global_state: Mapping[str, Tensor],
        updates: Sequence[SiteUpdate],
        cfg: ExperimentConfig,
        server_round: int,
        previous_saliency: Tensor | None = None,
        plan: RoundPlan | None = None,
    ) -> tuple[State, RoundOutcome]: ...


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch intra-op parallelism off for the block, restored after.

    Aggregation is memory-bound elementwise work: a second thread adds little bandwidth, and on
    a busy machine every two-thread op waits for a descheduled thread (measured 3-7x slower
    under load, docs/performance.md). Results do not depend on the thread count (elementwise).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class SerialAggregator:
    """Every group in the calling process, one after the other.

    Args:
        device: aggregate there (:func:`server_device`): the round's tensors are copied to it,
            the round runs with it as torch's default device (the aggregation code allocates
            without naming one), and the new state comes back to CPU. None: where they are (CPU).

    ``task_nodes``: the Ray nodes that ran the last round's mean tasks (empty: this process).
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.task_nodes: list[str] = []

    def receive(self, update: SiteUpdate, round_sites: int) -> None:
        """Called by the strategy with each checked update as it is decoded, before the
        round is aggregated; the serial path needs nothing ahead of time.

        Args:
            update: the decoded, checked update.
            round_sites: sites the round was sent to (how large the round will be).
        """

    def means_runner(self, updates: Sequence[SiteUpdate]) -> RunMeans:
        """The function that computes this round's group means (see ``aggregate_round``)."""
        return run_means_serial

    def aggregate(
        self,
        global_state: Mapping[str, Tensor],
        updates: Sequence[SiteUpdate],
        cfg: ExperimentConfig,
        server_round: int,
        previous_saliency: Tensor | None = None,
        plan: RoundPlan | None = None,
    ) -> tuple[State, RoundOutcome]:
        """See :func:`fedpanfm.federation.aggregate.aggregate_round` (same arguments)."""
        self.task_nodes = []
        runner = self.means_runner(updates)
        dev = self.device
        if dev is None:
            with one_thread():
                out = aggregate_round(global_state, updates, cfg, server_round, previous_saliency, runner, plan)
            note_aggregation(server_round, "ray" if self.task_nodes else "serial", self.task_nodes)
            return out
        moved = [dataclasses.replace(u, state=_to(u.state, dev), organ_subjects=u.organ_subjects.to(dev),
                                     gate_mass=u.gate_mass.to(dev), saliency=u.saliency.to(dev))
                 for u in updates]
        prev = previous_saliency.to(dev) if previous_saliency is not None else None
        with torch.device(dev):
            state, outcome = aggregate_round(_to(global_state, dev), moved, cfg, server_round, prev, run_means_serial, plan)
        outcome.saliency = outcome.saliency.cpu()
        note_aggregation(server_round, "serial", device=str(dev))
        return _to(state, torch.device("cpu")), outcome


def _to(state: Mapping[str, Tensor], device: torch.device) -> State:
    return {k: v.to(device) for k, v in state.items()}


def server_device(cfg: ExperimentConfig) -> torch.device:
    """Where the server aggregates: ``federation.server_device`` ("auto": CUDA when this process
    sees a GPU). Rounds under ``federation.dp`` stay on CPU: their noise comes from a CPU
    generator seeded from the OS (``fedpanfm/federation/privacy.py``)."""
    from fedpanfm.train.distributed import pick_device

    if cfg.federation.dp.enabled:
        return torch.device("cpu")
    return pick_device(cfg.federation.server_device)


#: A state dict as the object store holds it: one flat array per dtype, and per key
#: (key, dtype name, offset, shape) into it.
Packed = tuple[dict[str, np.ndarray], list[tuple[str, str, int, tuple[int, ...]]]]


def pack_state(state: Mapping[str, Tensor]) -> Packed:
    """``state`` as one flat numpy array per dtype plus its layout (one copy).

    ``ray.put`` of one large array runs at memory-copy speed; a dict of hundreds of arrays
    (pickled with an out-of-band buffer each) ran 3-10x slower here (docs/performance.md).

    Args:
        state: key -> CPU tensor.
    """
    by_dtype: dict[torch.dtype, list[tuple[str, Tensor]]] = {}
    for k, t in state.items():
        by_dtype.setdefault(t.dtype, []).append((k, t))
    flats: dict[str, np.ndarray] = {}
    layout: list[tuple[str, str, int, tuple[int, ...]]] = []
    for dtype, items in by_dtype.items():
        name = str(dtype).removeprefix("torch.")
        flat = torch.empty(sum(t.numel() for _, t in items), dtype=dtype)
        offset = 0
        for k, t in items:
            flat[offset : offset + t.numel()].copy_(t.reshape(-1))
            layout.append((k, name, offset, tuple(t.shape)))
            offset += t.numel()
        flats[name] = flat.numpy()
    return flats, layout


def unpack_state(packed: Packed, keys: Collection[str] | None = None) -> dict[str, Tensor]:
    """Tensors viewing a :func:`pack_state` payload (no copy), for ``keys`` present (None: all)."""
    flats, layout = packed
    with warnings.catch_warnings():
        # Object-store arrays are read-only; the aggregation never writes into its inputs.
        warnings.simplefilter("ignore", UserWarning)
        whole = {name: torch.from_numpy(a) for name, a in flats.items()}
    return {k: whole[name][off : off + math.prod(shape)].view(shape)
            for k, name, off, shape in layout if keys is None or k in keys}


@ray.remote(num_cpus=0)
def _mean_tasks_remote(tasks: list[MeanTask], previous: Packed, *site_states: Packed) -> tuple[Packed, str]:
    """A batch of mean tasks on a Ray worker; inputs arrive zero-copy from the object store.
    Returns the packed means and the Ray node that computed them."""
    keys = {k for t in tasks for k in t.keys}
    # Sparse expert transfer: a site's state may lack experts it gave zero weight.
    sites = [unpack_state(s, keys) for s in site_states]
    torch.set_num_threads(1)  # a worker process of its own; see one_thread()
    means = pack_state(run_means_serial(tasks, sites, unpack_state(previous, keys)))
    return means, ray.get_runtime_context().get_node_id()


def pack_tasks(tasks: Sequence[MeanTask], state: Mapping[str, Tensor], max_tasks: int) -> list[list[MeanTask]]:
    """Split ``tasks`` into at most ``max_tasks`` batches of similar byte size (largest first)."""
    if max_tasks < 1:
        raise ValueError(f"pack_tasks: max_tasks = {max_tasks} must be >= 1")
    size = {id(t): sum(state[k].numel() * state[k].element_size() for k in t.keys) for t in tasks}
    bins: list[list[MeanTask]] = [[] for _ in range(min(max_tasks, len(tasks)))]
    loads = [0] * len(bins)
    for t in sorted(tasks, key=lambda t: -size[id(t)]):
        i = loads.index(min(loads))
        bins[i].append(t)
        loads[i] += size[id(t)]
    return bins


class RayAggregator(SerialAggregator):
    """The mean tasks as Ray tasks (num_cpus=0) over the object store.

    Args:
        max_tasks: at most this many Ray tasks per round (None: the cluster's CPU count).
        serial_below_bytes: a round whose updates total fewer bytes runs serially in this
            process (same functions, same result): scheduling Ray tasks, and on a busy machine
            starting their workers, costs seconds, more than averaging a small model
            (docs/performance.md). 0: always Ray.
    """

    def __init__(self, max_tasks: int | None = None, serial_below_bytes: int = 0) -> None:
        super().__init__()
        if not ray.is_initialized():
            raise RuntimeError("RayAggregator: Ray is not initialised; call connect_ray(address) first")
        if serial_below_bytes < 0:
            raise ValueError(f"RayAggregator: serial_below_bytes = {serial_below_bytes} must be >= 0")
        self.max_tasks = max_tasks or max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.serial_below_bytes = serial_below_bytes
        #: (state, object ref) of updates put into the object store by :meth:`receive`.
        self._staged: list[tuple[Mapping[str, Tensor], ray.ObjectRef]] = []

    def receive(self, update: SiteUpdate, round_sites: int) -> None:
        """Put the update's arrays into the object store now, while the strategy decodes the
        other replies, so the round's aggregation does not start with one copy of every update
        (docs/performance.md, item 5). Rounds that will run serially are not put."""
        if state_nbytes(update.state) * max(1, round_sites) >= self.serial_below_bytes:
            with one_thread():  # see one_thread(): a two-thread copy was 10-25x slower under load
                self._staged.append((update.state, ray.put(pack_state(update.state))))

    def run_means(self, tasks: Sequence[MeanTask], site_states: Sequence[Mapping[str, Tensor]], previous: Mapping[str, Tensor],
                  staged: Sequence[tuple[Mapping[str, Tensor], ray.ObjectRef]] = ()) -> State:
        """Same contract as :func:`~fedpanfm.federation.means.run_means_serial`; ``staged``:
        (state, object ref) of states already in the object store (:meth:`receive`)."""
        out: State = {}
        # A group nobody weighted keeps the previous tensor (as mean_group does): no task.
        remote = []
        for t in tasks:
            if float(t.weights.sum()) > 0:
                remote.append(t)
            else:
                out.update({k: previous[k] for k in t.keys})
        if not remote:
            return out
        refs = {id(state): ref for state, ref in staged}  # the states live on in site_states
        site_refs = [refs[id(s)] if id(s) in refs else ray.put(pack_state(s)) for s in site_states]
        # The previous tensors only stand in for experts a site left out (zero weight there).
        absent = {k for t in remote for k in t.keys if any(k not in s for s in site_states)}
        prev_ref = ray.put(pack_state({k: previous[k] for k in absent}))
        futures = [_mean_tasks_remote.remote(batch, prev_ref, *site_refs) for batch in pack_tasks(remote, previous, self.max_tasks)]
        for result, node in ray.get(futures):
            # One copy out of the object store: the new global state must own its memory.
            out.update({k: src.clone() for k, src in unpack_state(result).items()})
            self.task_nodes.append(node)
        return out

    def means_runner(self, updates: Sequence[SiteUpdate]) -> RunMeans:
        """Ray tasks, or the serial path for a round smaller than ``serial_below_bytes``; takes
        the updates staged by :meth:`receive` (the next round starts with none)."""
        staged, self._staged = self._staged, []
        if sum(state_nbytes(u.state) for u in updates) < self.serial_below_bytes:
            return run_means_serial
        return lambda tasks, site_states, previous: self.run_means(tasks, site_states, previous, staged)


def connect_ray(address: str = "") -> None:
    """Make sure this process is connected to Ray.

    Args:
        address: with Ray already running in this process (simulation: ``fedpanfm simulate``
            started it from the same setting) that Ray; else "" starts a private local Ray and
            "auto", "host:port" or "ray://..." joins that cluster (``orchestration/ray_cluster.py``).
    """
    if ray.is_initialized():
        return
    start_ray(address)


def make_aggregator(cfg: ExperimentConfig) -> Aggregator:
    """A :class:`SerialAggregator` on the GPU when :func:`server_device` is one; else a
    :class:`RayAggregator` when ``cfg.federation.ray.enabled`` (connecting first), else a
    :class:`SerialAggregator`."""
    device = server_device(cfg)
    if device.type != "cpu":
        # The Ray path is a CPU path (its tasks read host memory in the object store).
        return SerialAggregator(device)
    if not cfg.federation.ray.enabled:
        return SerialAggregator()
    connect_ray(cfg.federation.ray.address)
    return RayAggregator(serial_below_bytes=int(cfg.federation.ray.serial_below_mib * 2**20))


__all__ = [
    "Aggregator",
    "RayAggregator",
    "SerialAggregator",
    "connect_ray",
    "make_aggregator",
    "one_thread",
    "unpack_state",
    "pack_state",
    "pack_tasks",
    "server_device",
]

"""Where the server's aggregation runs: serially in the ServerApp process, or as Ray tasks.

Both aggregators run the same pure functions (``fedpanfm.federation.aggregate``): the round is
planned into per-parameter-group mean tasks, the tasks run (here: serially or on Ray), and the
result is finished (directors, teacher policy, metrics) in the calling process. The Ray path
therefore gives bit-identical results to the serial one.

Ray specifics:
- each site's state dict is ``ray.put`` once, as numpy arrays (views of the tensors, so the only
  copy is into the object store; tasks read them zero-copy);
- tasks take ``num_cpus=0``: in simulation the ClientApp actors hold every CPU, and a 1-CPU task
  would wait for one forever;
- the groups are packed into a few tasks (``max_tasks``, balanced by bytes) rather than one task
  per group: Ray may start a worker process per concurrent 0-CPU task, and each worker imports
  torch, which on a small machine costs more than the averaging itself.

``submit_background`` runs side work (checkpoint writing, evaluation) without blocking the next
round: a 0-CPU Ray task pinned to this node (the files land where the server runs), or a thread
when Ray is not running; ``wait_background`` waits for all of them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import warnings
from logging import INFO
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import ray
import torch
from flwr.supercore import log
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from torch import Tensor

from fedpanfm.config import ExperimentConfig
from fedpanfm.federation.aggregate import MeanTask, RoundOutcome, RunMeans, State, aggregate_round, run_means_serial
from fedpanfm.federation.message import SiteUpdate, state_nbytes


#: Rounds with fewer update bytes than this aggregate serially even with Ray enabled: measured
#: here, the serial path reduces ~2 GB/s, so 64 MiB costs ~30 ms, less than one Ray round trip.
SERIAL_BELOW_BYTES = 64 * 2**20


class Aggregator(Protocol):
    """Closes a round: global state + site updates -> new global state and outcome."""

    def aggregate(
        self,
        global_state: Mapping[str, Tensor],
        updates: Sequence[SiteUpdate],
        cfg: ExperimentConfig,
        server_round: int,
        previous_saliency: Tensor | None = None,
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
    """Every group in the calling process, one after the other."""

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
    ) -> tuple[State, RoundOutcome]:
        """See :func:`fedpanfm.federation.aggregate.aggregate_round` (same arguments)."""
        with one_thread():
            return aggregate_round(global_state, updates, cfg, server_round, previous_saliency,
                                   self.means_runner(updates))


def _as_numpy(state: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
    # Views, not copies: ray.put copies once into the object store.
    return {k: t.detach().cpu().contiguous().numpy() for k, t in state.items()}


def _as_torch(arrays: Mapping[str, np.ndarray], keys: Sequence[str] | None = None) -> dict[str, Tensor]:
    with warnings.catch_warnings():
        # Object-store arrays are read-only; the aggregation never writes into its inputs.
        warnings.simplefilter("ignore", UserWarning)
        return {k: torch.from_numpy(arrays[k]) for k in (keys if keys is not None else arrays)}


@ray.remote(num_cpus=0)
def _mean_tasks_remote(tasks: list[MeanTask], previous: dict[str, np.ndarray], *site_states: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A batch of mean tasks on a Ray worker; inputs arrive zero-copy from the object store."""
    keys = [k for t in tasks for k in t.keys]
    # Sparse expert transfer: a site's state may lack experts it gave zero weight.
    sites = [_as_torch(s, [k for k in keys if k in s]) for s in site_states]
    torch.set_num_threads(1)  # a worker process of its own; see one_thread()
    out = run_means_serial(tasks, sites, _as_torch(previous, keys))
    return {k: v.numpy() for k, v in out.items()}


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
        if not ray.is_initialized():
            raise RuntimeError("RayAggregator: Ray is not initialised; call connect_ray(address) first")
        if serial_below_bytes < 0:
            raise ValueError(f"RayAggregator: serial_below_bytes = {serial_below_bytes} must be >= 0")
        self.max_tasks = max_tasks or max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.serial_below_bytes = serial_below_bytes

    def run_means(self, tasks: Sequence[MeanTask], site_states: Sequence[Mapping[str, Tensor]], previous: Mapping[str, Tensor]) -> State:
        """Same contract as :func:`~fedpanfm.federation.aggregate.run_means_serial`."""
        if not tasks:
            return {}
        site_refs = [ray.put(_as_numpy(s)) for s in site_states]
        needed = {k for t in tasks for k in t.keys}
        prev_ref = ray.put(_as_numpy({k: previous[k] for k in needed}))
        futures = [_mean_tasks_remote.remote(batch, prev_ref, *site_refs) for batch in pack_tasks(tasks, previous, self.max_tasks)]
        out: State = {}
        for result in ray.get(futures):
            # One copy out of the object store: the new global state must own its memory.
            out.update({k: torch.from_numpy(np.array(v)) for k, v in result.items()})
        return out

    def means_runner(self, updates: Sequence[SiteUpdate]) -> RunMeans:
        """Ray tasks, or the serial path for a round smaller than ``serial_below_bytes``."""
        small = sum(state_nbytes(u.state) for u in updates) < self.serial_below_bytes
        return run_means_serial if small else self.run_means


def connect_ray(address: str = "") -> None:
    """Make sure this process is connected to Ray.

    Args:
        address: "" joins the Ray this process already runs (simulation) or starts a local one;
            "auto" or "host:port" joins that cluster.
    """
    if ray.is_initialized():
        if address:
            log(INFO, "Ray already initialised in this process; federation.ray.address %r not used", address)
        return
    if address:
        ray.init(address=address)
    else:
        ray.init(include_dashboard=False)


def make_aggregator(cfg: ExperimentConfig) -> Aggregator:
    """A :class:`RayAggregator` when ``cfg.federation.ray.enabled`` (connecting first), else a
    :class:`SerialAggregator`."""
    if not cfg.federation.ray.enabled:
        return SerialAggregator()
    connect_ray(cfg.federation.ray.address)
    return RayAggregator(serial_below_bytes=SERIAL_BELOW_BYTES)


# --------------------------------------------------------------------------- background work

_pending: list[tuple[str, Any]] = []
_threads: concurrent.futures.ThreadPoolExecutor | None = None


@ray.remote(num_cpus=0)
def _call_remote(fn: Callable[..., Any], *args: Any) -> Any:
    """Any callable as a Ray task (``ray.remote`` itself rejects builtins and bound methods)."""
    return fn(*args)


def submit_background(fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)`` without waiting for it (checkpoint writing, evaluation).

    With Ray running: a 0-CPU task pinned to this node, so files it writes land beside the
    server. Without Ray: a thread of a small pool. Errors surface in :func:`wait_background`.
    """
    global _threads
    name = getattr(fn, "__qualname__", repr(fn))
    if ray.is_initialized():
        node = ray.get_runtime_context().get_node_id()
        pinned = _call_remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
        _pending.append((name, pinned.remote(fn, *args)))
        return
    if _threads is None:
        _threads = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="fedpanfm-bg")
    _pending.append((name, _threads.submit(fn, *args)))


def wait_background() -> list[Any]:
    """Wait for every submitted background job; returns their results in submission order.

    Raises RuntimeError naming the first job that failed (after waiting for all of them).
    """
    jobs = list(_pending)
    _pending.clear()
    results: list[Any] = []
    failed: list[tuple[str, BaseException]] = []
    for name, job in jobs:
        try:
            results.append(job.result() if isinstance(job, concurrent.futures.Future) else ray.get(job))
        except Exception as exc:  # noqa: BLE001 - collected and re-raised below with the job's name
            # A RayTaskError wraps the job's own exception in a traceback dump; report the original.
            cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None else exc
            failed.append((name, cause))
            results.append(None)
    if failed:
        name, exc = failed[0]
        raise RuntimeError(f"background job {name} failed ({len(failed)} of {len(jobs)} failed): {exc}") from exc
    return results


__all__ = [
    "Aggregator",
    "RayAggregator",
    "SerialAggregator",
    "connect_ray",
    "make_aggregator",
    "one_thread",
    "pack_tasks",
    "submit_background",
    "wait_background",
]

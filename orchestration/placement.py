"""Where things ran: the Ray node, host and device of every site's training call and of every aggregation.

In simulation the sites' ClientApp runs in Ray actors on any node of the cluster.
:func:`placed_client_app` wraps it so that each training call reports ``(site, round, node,
host, device)`` to a small named actor pinned to the server's node (one round trip of a few ms
per call, before the site replies; a failed report is logged, never fails the site). The
aggregators note their own rounds in-process (:func:`note_aggregation`) and, since every site
of the round has replied by then, drain the actor's records at the same time: Flower's
simulation runtime shuts Ray down as it ends, so nothing is read from Ray afterwards.
``fedpanfm simulate`` writes the records (:meth:`PlacementLog.summary`) into ``summary.json``
(``placement``) and the TensorBoard sub-run ``placement`` (:func:`write_tensorboard`).

Our design choices:

- A named actor rather than a field of the site's reply: the reply format is the site/server
  protocol (docs/federation.md), and where a simulated site ran is a fact of the simulation
  runtime, not something a deployed site reports about its hospital's machines.
- One record per training call, not per actor: Flower hands a site to whichever actor is idle,
  so a site may move between nodes from round to round.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Record = dict[str, Any]


def here(device: str = "cpu") -> Record:
    """This process's place: Ray node id (when Ray runs), host, IP, pid, and the device.

    Args:
        device: the config's ``device`` value ("auto", "cpu", "cuda"), resolved here as the
            trainer resolves it (``fedpanfm.train.distributed.pick_device``); with CUDA also the
            GPU's name and the physical GPU ids Ray assigned to this process.
    """
    import ray

    rec: Record = {"host": socket.gethostname(), "pid": os.getpid()}
    if ray.is_initialized():
        ctx = ray.get_runtime_context()
        rec["node_id"] = ctx.get_node_id()
        rec["ip"] = ray.util.get_node_ip_address()
    import torch

    from fedpanfm.train.distributed import pick_device

    dev = pick_device(device)
    rec["device"] = str(dev)
    if dev.type == "cuda":
        rec["gpu_name"] = torch.cuda.get_device_name(dev)
        if ray.is_initialized():
            rec["gpu_ids"] = [str(g) for g in ray.get_gpu_ids()]
    return rec


class _Sink:
    """The records of one run (a Ray actor on the server's node)."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    def add(self, record: Record) -> None:
        self.records.append(record)

    def drain(self) -> list[Record]:
        out, self.records = self.records, []
        return out


_HANDLES: dict[str, Any] = {}


def report(sink: str, record: Record) -> None:
    """Send ``record`` to the named sink actor (waits for it: the run may end right after)."""
    import ray

    handle = _HANDLES.get(sink)
    if handle is None:
        handle = _HANDLES[sink] = ray.get_actor(sink)
    ray.get(handle.add.remote(record))


def placed_client_app(inner: Any, sink: str, device: str) -> Any:
    """A ClientApp that runs ``inner`` and reports where each training call ran.

    Args:
        inner: the sites' ClientApp.
        sink: the name of the run's sink actor (:class:`PlacementLog`).
        device: the config's ``device`` value.
    """
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

    from fedpanfm.data.site_statistics import ACTION as STATISTICS_ACTION
    from fedpanfm.federation.protocol import SERVER_CONFIG, SITE_CONFIG

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = inner(msg, context)
        try:
            if not reply.has_error():
                rec = here(device)
                server_round = msg.content[SERVER_CONFIG]["server-round"]
                if not isinstance(server_round, int):
                    raise TypeError(f"server-round is a {type(server_round).__name__}, not an int")
                rec.update(kind="site", site=str(reply.content[SITE_CONFIG]["site-name"]), round=server_round)
                report(sink, rec)
        except Exception as exc:  # noqa: BLE001 - where it ran is a record, never a reason to fail the site
            log.warning("placement: could not record where this training call ran: %s: %s", type(exc).__name__, exc)
        return reply

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return inner(msg, context)

    @app.query(STATISTICS_ACTION)  # the cohort-statistics query (orchestration/cohort_statistics.py)
    def statistics(msg: Message, context: Context) -> Message:
        return inner(msg, context)

    return app


_CURRENT: "PlacementLog | None" = None


def note_aggregation(server_round: int, mode: str, nodes: Sequence[str] = (), device: str = "cpu") -> None:
    """Record where round ``server_round`` was aggregated, when a :class:`PlacementLog` records.

    Args:
        server_round: the round.
        mode: "serial" (the server process) or "ray" (Ray tasks).
        nodes: the Ray node ids of the tasks ("ray").
        device: the device the server process aggregated on.
    """
    if _CURRENT is None:
        return
    rec = here()
    rec.update(kind="aggregation", round=int(server_round), mode=mode, device=device)
    if nodes:
        rec["task_nodes"] = sorted(set(nodes))
    _CURRENT.local.append(rec)
    _CURRENT.drain()


class PlacementLog:
    """The placement records of one run: a sink actor for the sites, a list for the server."""

    def __init__(self) -> None:
        self.name = f"fedpanfm-placement-{uuid.uuid4().hex[:12]}"
        self.local: list[Record] = []
        self._actor: Any = None

    @contextmanager
    def recording(self) -> Iterator["PlacementLog"]:
        """Within the block the sink actor lives (on this node) and aggregations are noted."""
        global _CURRENT
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = ray.get_runtime_context().get_node_id()
        self._actor = ray.remote(num_cpus=0)(_Sink).options(
            name=self.name, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
        _CURRENT = self
        try:
            yield self
        finally:
            _CURRENT = None
            if ray.is_initialized():  # Flower's runtime normally shut it down, actor included
                self.drain()
                ray.kill(self._actor)
            self._actor = None

    def drain(self) -> None:
        """Move the sites' records from the sink actor into :attr:`local`."""
        import ray

        if self._actor is not None:
            self.local.extend(ray.get(self._actor.drain.remote(), timeout=60))

    def records(self) -> list[Record]:
        return list(self.local)

    def summary(self) -> dict[str, Any]:
        """``{"nodes": {node_id: {"host", "ip"}}, "sites": {site: [{"round", "node_id", "host",
        "device", ...}]}, "aggregation": [{"round", "mode", "node_id", "host", "device", ...}]}``,
        rounds in order."""
        return summarise(self.records())


def summarise(records: Sequence[Record]) -> dict[str, Any]:
    """See :meth:`PlacementLog.summary`."""
    nodes: dict[str, dict[str, str]] = {}
    sites: dict[str, list[Record]] = {}
    aggregation: list[Record] = []
    for rec in sorted(records, key=lambda r: (r.get("round", 0), str(r.get("site", "")))):
        if "node_id" in rec:
            nodes.setdefault(rec["node_id"], {"host": rec.get("host", ""), "ip": rec.get("ip", "")})
        body = {k: v for k, v in rec.items() if k not in ("kind", "site")}
        if rec.get("kind") == "site":
            sites.setdefault(str(rec["site"]), []).append(body)
        elif rec.get("kind") == "aggregation":
            aggregation.append(body)
    return {"nodes": nodes, "sites": dict(sorted(sites.items())), "aggregation": aggregation}


def write_tensorboard(tb_dir: Path, placement: Mapping[str, Any]) -> None:
    """The placement as the TensorBoard sub-run ``placement``: a text table (TEXT tab) of who ran
    where per round, and per round the index of the node (in ``placement["nodes"]`` order) that
    hosted each site (``site/<name>/node``) and the number of nodes hosting sites
    (``nodes_hosting_sites``)."""
    from torch.utils.tensorboard import SummaryWriter

    index = {node: i for i, node in enumerate(placement["nodes"])}
    lines = ["| node | id | host | ip |", "|---|---|---|---|"]
    lines += [f"| {index[n]} | {n[:12]} | {v['host']} | {v['ip']} |" for n, v in placement["nodes"].items()]
    lines += ["", "| round | who | node | device |", "|---|---|---|---|"]
    rows: list[tuple[int, str, str, str]] = []
    for site, recs in placement["sites"].items():
        rows += [(r["round"], f"site {site}", str(index.get(r.get("node_id"), "-")), r.get("device", "")) for r in recs]
    for r in placement["aggregation"]:
        where = ", ".join(str(index.get(n, n[:12])) for n in r.get("task_nodes", [])) or str(index.get(r.get("node_id"), "-"))
        rows.append((r["round"], f"aggregation ({r['mode']})", where, r.get("device", "")))
    lines += [f"| {r} | {who} | {node} | {dev} |" for r, who, node, dev in sorted(rows)]
    writer = SummaryWriter(log_dir=str(Path(tb_dir) / "placement"))
    try:
        writer.add_text("placement", "\n".join(lines), global_step=0)
        per_round: dict[int, set[str]] = {}
        for site, recs in placement["sites"].items():
            for r in recs:
                if r.get("node_id") in index:
                    writer.add_scalar(f"site/{site}/node", index[r["node_id"]], global_step=r["round"])
                    per_round.setdefault(r["round"], set()).add(r["node_id"])
        for rnd, hosting in sorted(per_round.items()):
            writer.add_scalar("nodes_hosting_sites", len(hosting), global_step=rnd)
    finally:
        writer.close()


__all__ = ["PlacementLog", "here", "note_aggregation", "placed_client_app", "report", "summarise", "write_tensorboard"]

"""Which site a Flower node is, from how it authenticated, never from what its replies say.

A reply's ``site-name`` is the sender's claim; the node id Flower stamps on the reply
(``metadata.src_node_id``) is set by the SuperLink from the connection the reply came over. The
server therefore maps node ids to sites from what the runtime knows:

- **Deployment** (``flower-superlink --enable-supernode-auth``): only SuperNodes whose public key
  the coordinator registered may connect, and the coordinator registers each key under its site
  name (``flwr supernode register KEY --name SITE``, orchestration/coordinator.py). The Grid's
  ``get_nodes()`` returns that ``NodeInfo.name`` per node id.
- **Simulation** (Flower's in-memory runtime): node k serves partition k, i.e. the k-th site
  folder of ``cfg.cohort`` (sites/runtime.py ``resolve_site``). Flower 1.41 creates the nodes in
  partition order (``vce_api._register_nodes``: ``nodes_mapping[node_id] = i``) in its in-memory
  link state, whose node table keeps that order; we read it from there.

A node the runtime names no site for (an insecure SuperLink, a node registered without a name) has
no identity: its replies are refused. Our design: docs/security.md, "Site identity".
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedpanfm.config import ExperimentConfig
from fedpanfm.site_names import check_site_name


class IdentityError(RuntimeError):
    """The runtime's node table cannot be turned into node -> site (e.g. two nodes, one name)."""


def _unwrap(grid: Any) -> Any:
    """The Flower Grid under our wrappers (``MeteredGrid`` keeps it as ``_grid``)."""
    while hasattr(grid, "_grid"):
        grid = grid._grid
    return grid


def simulation_node_sites(grid: Any, cfg: ExperimentConfig) -> dict[int, str] | None:
    """node id -> site for Flower's in-memory simulation Grid; None for any other Grid.

    Args:
        grid: the Grid handed to the ServerApp (possibly wrapped).
        cfg: the experiment config (``cohort``: its site folders in ``list_sites`` order).
    """
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    inner = _unwrap(grid)
    if not isinstance(inner, InMemoryGrid):
        return None
    if not isinstance(inner.state, InMemoryLinkState):
        raise IdentityError(f"simulation: the Grid's link state is a {type(inner.state).__name__}, not Flower's "
                            "in-memory one, whose node table gives the partition order")
    from fedpanfm.data.dataset import list_sites

    sites = [Path(s).name for s in list_sites(Path(cfg.cohort))]
    nodes = list(inner.state.nodes)  # creation order = partition order (module docstring)
    if len(nodes) > len(sites):
        raise IdentityError(f"simulation: {len(nodes)} nodes for {len(sites)} site folders in {cfg.cohort}")
    return {int(node): sites[k] for k, node in enumerate(nodes)}


def registered_node_sites(grid: Any) -> dict[int, str]:
    """node id -> the site name the coordinator registered the node's key under (``NodeInfo.name``);
    nodes without a name are left out."""
    get_nodes = getattr(grid, "get_nodes", None)
    if get_nodes is None:
        return {}
    out: dict[int, str] = {}
    for info in get_nodes():
        name = getattr(info, "name", "") or ""
        if name:
            out[int(info.node_id)] = check_site_name(name, f"node {info.node_id}: registered name")
    return out


def node_sites(grid: Any, cfg: ExperimentConfig) -> dict[int, str]:
    """node id -> authenticated site name for every node the runtime knows.

    Raises:
        IdentityError: two nodes carry the same site name.
    """
    found = simulation_node_sites(grid, cfg)
    if found is None:
        found = registered_node_sites(grid)
    check_unique(found)
    return found


def check_unique(mapping: Mapping[int, str]) -> None:
    """Raise :class:`IdentityError` when two node ids map to one site."""
    seen: dict[str, int] = {}
    for node, site in mapping.items():
        if site in seen and seen[site] != node:
            raise IdentityError(f"nodes {seen[site]} and {node} are both registered as site {site!r}")
        seen[site] = node


__all__ = ["IdentityError", "check_unique", "node_sites", "registered_node_sites", "simulation_node_sites"]

"""The server's cohort-statistics round: before round 1, every connected site is asked for its
cohort statistics (aggregates only, fedpanfm/data/site_statistics.py) and the answers become
one table in the run folder and in TensorBoard, so a coordinator sees site heterogeneity
(spacing, shape, orientation, modality, intensity before and after preprocessing, organ
coverage) without seeing data.

Written to the run folder::

    cohort_statistics.json   {"min_cell", "sites": {site: released statistics}, "dropped": {site: why}}
    cohort_statistics.csv    one row per site (subjects, organ coverage, q50 of every value, categories)

and to the server's TensorBoard sub-run at step 0: ``cohort/statistics`` (TEXT tab, a markdown
table per site and organ) and ``cohort/heterogeneity`` (IMAGES tab).

Trust: a reply is used only when it comes from a node with an authenticated site
(orchestration/identity.py), claims that same site, and passes
:func:`~fedpanfm.data.site_statistics.statistics_from_text` (keys, sizes, bounds, the release
rules); otherwise it is dropped with one log line naming the site and the reason. Our choice:
the round never stops a federation: an error (a site without the handler, a timeout, a bad
reply) is logged and training starts regardless. A resumed run keeps the table it has.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from fedpanfm.config import ExperimentConfig
from fedpanfm.data.site_statistics import (
    MESSAGE_TYPE,
    RECORD,
    REQUEST_MIN_CELL,
    TEXT_KEY,
    StatisticsError,
    markdown_table,
    statistics_from_text,
    table_rows,
)
from fedpanfm.federation.protocol import SERVER_CONFIG, SITE_CONFIG
from fedpanfm.tb import RunLogger
from orchestration.identity import node_sites

log = logging.getLogger(__name__)

JSON_NAME, CSV_NAME = "cohort_statistics.json", "cohort_statistics.csv"
TEXT_TAG, IMAGE_TAG = "cohort/statistics", "cohort/heterogeneity"
#: How often the server looks for connecting nodes while it waits for ``min_sites`` (seconds).
_POLL_S = 1.0


@dataclass
class CohortStatistics:
    """The statistics round's outcome: site -> released statistics, site (or node) -> why dropped."""

    min_cell: int
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)


def _wait_for_nodes(grid: Any, wanted: int, timeout_s: float) -> list[int]:
    """The connected node ids once ``wanted`` are connected, or whatever is connected at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(int(n) for n in grid.get_node_ids())
        if len(nodes) >= wanted or time.monotonic() >= deadline:
            return nodes
        time.sleep(_POLL_S)


def decode_reply(reply: Message, sites: Mapping[int, str], cfg: ExperimentConfig, min_cell: int) -> tuple[str, dict[str, Any]]:
    """(authenticated site, checked statistics) of one reply.

    Raises:
        StatisticsError: the node has no authenticated site, the reply is an error, claims another
            site, or its statistics fail the check; the message says which.
    """
    node = int(reply.metadata.src_node_id)
    site = sites.get(node)
    if site is None:
        raise StatisticsError(f"node {node}: no authenticated site (orchestration/identity.py)")
    if reply.has_error():
        raise StatisticsError(f"site {site}: error reply: {reply.error.reason}")
    content = reply.content
    if SITE_CONFIG not in content.config_records or RECORD not in content.config_records:
        raise StatisticsError(f"site {site}: reply lacks the ConfigRecords {SITE_CONFIG!r} and {RECORD!r}")
    claimed = content.config_records[SITE_CONFIG].get("site-name")
    if claimed != site:
        raise StatisticsError(f"site {site}: reply claims to be site {str(claimed)[:80]!r}")
    stats = statistics_from_text(content.config_records[RECORD].get(TEXT_KEY), cfg.data.organ_set().names,
                                 min_cell, cfg.federation.max_site_subjects)
    return site, stats


def collect_statistics(grid: Any, cfg: ExperimentConfig) -> CohortStatistics:
    """Ask every connected site (after waiting for ``min_sites`` of them, at most
    ``round_timeout_s``) and keep the replies that pass :func:`decode_reply`."""
    fed = cfg.federation
    out = CohortStatistics(fed.statistics_min_cell)
    nodes = _wait_for_nodes(grid, fed.min_sites, fed.round_timeout_s)
    sites = node_sites(grid, cfg)
    request = RecordDict({SERVER_CONFIG: ConfigRecord({REQUEST_MIN_CELL: fed.statistics_min_cell})})
    messages = [Message(content=request, message_type=MESSAGE_TYPE, dst_node_id=n) for n in nodes]
    t0 = time.perf_counter()
    replies = list(grid.send_and_receive(messages, timeout=fed.round_timeout_s))
    answered = set()
    for reply in replies:
        node = int(reply.metadata.src_node_id)
        answered.add(node)
        try:
            site, stats = decode_reply(reply, sites, cfg, fed.statistics_min_cell)
        except StatisticsError as exc:
            out.dropped[sites.get(node, f"node_{node}")] = str(exc)
            log.warning("cohort statistics: dropped the reply of %s: %s", sites.get(node, f"node {node}"), exc)
            continue
        out.sites[site] = stats
    for node in set(nodes) - answered:
        out.dropped[sites.get(node, f"node_{node}")] = f"no reply within {fed.round_timeout_s:g} s"
        log.warning("cohort statistics: no reply from %s", sites.get(node, f"node {node}"))
    log.info("cohort statistics: %d of %d site(s) answered in %.1f s", len(out.sites), len(nodes),
             time.perf_counter() - t0)
    return out


def write_statistics(folder: Path, result: CohortStatistics, tb: RunLogger | None = None) -> dict[str, Path]:
    """``cohort_statistics.json`` and ``.csv`` in ``folder`` and, with ``tb``, the text table and the
    heterogeneity picture at step 0 (module docstring)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / JSON_NAME, "csv": folder / CSV_NAME}
    paths["json"].write_text(json.dumps({"min_cell": result.min_cell, "sites": result.sites,
                                         "dropped": result.dropped}, indent=1))
    columns, rows = table_rows(result.sites)
    with paths["csv"].open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    if tb is not None and result.sites:
        from fedpanfm.tb_figures import cohort_heterogeneity

        dropped = "".join(f"\n\ndropped: {site}: {why}" for site, why in sorted(result.dropped.items()))
        tb.text(TEXT_TAG, f"Cohort statistics (aggregates over >= {result.min_cell} subjects; empty = withheld)\n\n"
                + markdown_table(result.sites) + dropped, 0)
        try:
            tb.image(IMAGE_TAG, cohort_heterogeneity(result.sites), 0)
        except Exception as exc:  # noqa: BLE001 - a picture never stops a federation
            log.warning("cohort statistics: the heterogeneity picture failed: %s: %s", type(exc).__name__, exc)
        tb.flush()
    return paths


def statistics_round(grid: Any, cfg: ExperimentConfig, folder: Path, tb: RunLogger | None) -> CohortStatistics | None:
    """The ServerApp's statistics round (module docstring); None when off, already recorded
    (a resumed run), or failed (logged)."""
    if not cfg.federation.cohort_statistics or (Path(folder) / JSON_NAME).is_file():
        return None
    try:
        result = collect_statistics(grid, cfg)
        write_statistics(folder, result, tb)
    except Exception as exc:  # noqa: BLE001 - statistics never stop a federation (module docstring)
        log.warning("cohort statistics round failed; training starts without it: %s: %s", type(exc).__name__, exc)
        return None
    return result


__all__ = ["CSV_NAME", "CohortStatistics", "IMAGE_TAG", "JSON_NAME", "TEXT_TAG", "collect_statistics", "decode_reply",
           "statistics_round", "write_statistics"]

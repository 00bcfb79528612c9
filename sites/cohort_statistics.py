"""The site's answer to the server's cohort-statistics query (Flower ``query.cohort_statistics``).

The site reads and preprocesses its images as training would and replies aggregates only
(fedpanfm/data/site_statistics.py: counts, smoothed quantiles and category counts over at
least k subjects, small cells withheld). The release threshold is the largest of what the
server asks (``min-cell``), the experiment config's ``federation.statistics_min_cell``, the
site's own node config ``statistics-min-cell`` and the library floor ``MIN_CELL``: the server
can ask for more, never for less. A site whose node config says ``cohort-statistics='off'``
declines (an error reply; training is unaffected).

It runs in the ClientApp process, not the trainer worker: it needs no model. The config is the
one the site trains with (the site's run-config allowlist applied, sites/run_config_allowlist.py),
and a failure reaches the coordinator redacted (sites/public_errors.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedpanfm.config import ExperimentConfig
from fedpanfm.data.site_statistics import (
    MIN_CELL,
    RECORD,
    REQUEST_MIN_CELL,
    TEXT_KEY,
    measure_statistics,
    statistics_to_text,
)
from sites.public_errors import PublicError, redacted

log = logging.getLogger(__name__)

#: Node config keys a site sets to decline the query or to raise its threshold.
NODE_SWITCH, NODE_MIN_CELL = "cohort-statistics", "statistics-min-cell"


class StatisticsDeclined(PublicError, RuntimeError):
    """The site's node config turns the statistics query off."""


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what}: {value!r} is not an integer")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: {value!r} is not an integer") from None


def release_threshold(request: Mapping[str, Any], node_config: Mapping[str, Any], configured: int) -> int:
    """The k the site releases with (module docstring).

    Args:
        request: the server's request record (``min-cell``; absent: 0).
        node_config: the site's node config (``statistics-min-cell``; absent: 0).
        configured: ``federation.statistics_min_cell`` of the run's config.
    """
    asked = _int(request.get(REQUEST_MIN_CELL, 0), f"server request {REQUEST_MIN_CELL}")
    own = _int(node_config.get(NODE_MIN_CELL, 0), f"node config {NODE_MIN_CELL}")
    return max(asked, own, configured, MIN_CELL)


def answer_statistics(msg: Message, context: Context, cfg: ExperimentConfig) -> Message:
    """Measure this site and reply its released statistics.

    Args:
        msg: the server's query; its ConfigRecord ``fedpanfm`` may hold ``min-cell``.
        context: this node's context (the node config names the site and its data).
        cfg: the experiment config the site trains with.
    """
    # Imported here: the thin ClientApp (a trainer worker serves training) never loads torch for
    # its other messages.
    from fedpanfm.federation.protocol import PROTOCOL_VERSION, SERVER_CONFIG, SITE_CONFIG
    from sites.runtime import resolve_site

    if str(context.node_config.get(NODE_SWITCH, "on")).lower() in ("off", "false", "0", "no"):
        raise StatisticsDeclined(f"node config {NODE_SWITCH}={context.node_config[NODE_SWITCH]!r}: this site does not "
                                 "share cohort statistics")
    name, site_dir = resolve_site(context.node_config, cfg)
    request: Mapping[str, Any] = msg.content[SERVER_CONFIG] if SERVER_CONFIG in msg.content.config_records else {}
    k = release_threshold(request, context.node_config, cfg.federation.statistics_min_cell)
    t0 = time.perf_counter()
    stats = measure_statistics(site_dir, cfg, k)
    log.info("site %s: cohort statistics over %s subjects (min cell %d) in %.1f s, %d value(s) withheld",
             name, stats["subjects"], k, time.perf_counter() - t0, len(stats["withheld"]))
    content = RecordDict({
        SITE_CONFIG: ConfigRecord({"protocol-version": PROTOCOL_VERSION, "site-name": name}),
        RECORD: ConfigRecord({TEXT_KEY: statistics_to_text(stats)}),
    })
    return Message(content, reply_to=msg)


def statistics_handler(
    run_config: Mapping[str, Any] | None,
    config_of: Callable[[Mapping[str, Any], Mapping[str, Any]], ExperimentConfig],
) -> Callable[[Message, Context], Message]:
    """The ClientApp's ``query.cohort_statistics`` function.

    Args:
        run_config: the run config to use (in-process simulation); None reads the context's.
        config_of: (run config, node config) -> the site's experiment config (the ClientApp's).
    """

    def handler(msg: Message, context: Context) -> Message:
        try:
            resolved = run_config if run_config is not None else context.run_config
            return answer_statistics(msg, context, config_of(resolved, context.node_config))
        except Exception as exc:
            label = f"site {context.node_config.get('site-name', context.node_config.get('partition-id', '?'))}"
            raise redacted("cohort statistics", exc, label, log) from exc

    return handler


__all__ = ["NODE_MIN_CELL", "NODE_SWITCH", "StatisticsDeclined", "answer_statistics", "release_threshold",
           "statistics_handler"]

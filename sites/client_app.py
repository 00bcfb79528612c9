"""The site's Flower ClientApp: routes ``train`` / ``evaluate`` to the site handlers
(``sites/handlers.py``: local SSL training and validation on the site's own subjects).

The experiment config comes from the run config (keys ``config`` and ``overrides``, from
``pyproject.toml`` ``[tool.flwr.app.config]`` or ``flwr run --run-config``). Flower's in-process
simulation gives apps an empty run config, so ``build_client_app(run_config)`` makes an app
that carries its own; the module-level ``app`` reads the context's.

Errors become a failed reply (Flower sends the exception's text), which the strategy tolerates:
the text is redacted first (sites/public_errors.py), the full error logged at the site. At a
deployed site the run config passes the site's allowlist first (sites/run_config_allowlist.py).

Deployment: a node config naming a ``trainer-socket`` makes this process thin: it forwards the
message to the site's long-lived trainer worker (``sites/worker/``), which keeps the DeepSpeed
engine across rounds. torch, DeepSpeed and the training modules are imported inside the site
handlers, so the thin path never loads them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedpanfm.config import ExperimentConfig
from fedpanfm.data.site_statistics import ACTION as STATISTICS_ACTION
from sites.cohort_statistics import statistics_handler
from sites.handlers import evaluate_site, train_site
from sites.public_errors import redacted
from sites.run_config_allowlist import is_deployed, site_experiment_config
from sites.step_curves import with_run_folder
from sites.worker.client import WorkerTarget, call_worker
from sites.worker.wire import WorkerUnavailable

log = logging.getLogger(__name__)

Handler = Callable[[Message, Context], Message]


def _site_label(context: Context) -> str:
    nc = context.node_config
    if "site-name" in nc:
        return f"site {nc['site-name']}"
    return f"site partition {nc.get('partition-id', '?')} (node {context.node_id})"


_CONFIGS: dict[tuple[Any, ...], ExperimentConfig] = {}


def _config(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> ExperimentConfig:
    """``site_experiment_config(run_config, node_config)`` (the site's allowlist applied,
    sites/run_config_allowlist.py), parsed once per process while the run config and the config
    file's modification time stay the same: parsing the YAML and overrides took ~10 ms of every
    site call (docs/performance.md, item 4). Configs are never modified."""
    path = Path(str(run_config.get("config", "")))
    try:
        # A deployed site never touches a path the coordinator names, not even to stat it.
        mtime = path.stat().st_mtime_ns if not (run_config.get("config-yaml") or is_deployed(node_config)) else None
    except OSError:
        mtime = None  # no such file: config_from_run_config raises the clear error below
    key = (tuple(sorted((str(k), str(v)) for k, v in run_config.items())), mtime,
           tuple(sorted((str(k), str(v)) for k, v in node_config.items())))
    cfg = _CONFIGS.get(key)
    if cfg is None:
        cfg = site_experiment_config(run_config, node_config)
        if len(_CONFIGS) >= 8:
            _CONFIGS.clear()
        _CONFIGS[key] = cfg
    return cfg


def _logged(what: str, fn: Callable[[Message, Context, ExperimentConfig], Message],
            run_config: Mapping[str, Any] | None) -> Handler:
    """Wrap a handler: resolve the config (the site's allowlist), and on failure log the error in
    full at the site and raise its redacted form (what Flower sends the coordinator)."""

    def handler(msg: Message, context: Context) -> Message:
        try:
            resolved = run_config if run_config is not None else context.run_config
            cfg = _config(resolved, context.node_config)  # refused here, before the worker sees it
            target = WorkerTarget.from_node_config(context.node_config)
            if target is not None:
                try:
                    content, stats = call_worker(target, what, msg, context, resolved)
                    log.info("%s: %s ran in trainer worker %s in %.2f s", _site_label(context), what,
                             stats.get("pid"), stats.get("seconds", float("nan")))
                    return Message(content, reply_to=msg)
                except WorkerUnavailable as exc:
                    if target.fallback == "fail":
                        raise
                    log.warning("%s: %s; %s runs in this ClientApp process instead (trainer-fallback=local)",
                                _site_label(context), exc, what)
            elif "site-name" in context.node_config:
                log.info("%s: no trainer-socket in the node config: %s runs in this ClientApp process",
                         _site_label(context), what)
            return fn(msg, context, cfg)
        except Exception as exc:
            # What Flower sends the coordinator is this exception's text: redacted (no paths,
            # file names or subject ids); the full error is logged here (sites/public_errors.py).
            raise redacted(what, exc, _site_label(context), log) from exc

    return handler


def build_client_app(run_config: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp running :func:`train_site` and :func:`evaluate_site`.

    Args:
        run_config: ``{"config": path, "overrides": "K=V ..."}`` to use instead of the
            context's run config (in-process simulation, where Flower passes none); None reads
            ``context.run_config``.
    """
    client = ClientApp()
    client.train()(_logged("train", with_run_folder(train_site, run_config), run_config))
    client.evaluate()(_logged("evaluate", evaluate_site, run_config))
    # The server's cohort-statistics query (aggregates only; sites/cohort_statistics.py).
    client.query(STATISTICS_ACTION)(statistics_handler(run_config, _config))
    return client


app = build_client_app()

"""A deployed site applies the coordinator's run config through the federation's allowlist.

A deployed site (node config naming ``site-name`` and ``data-dir``) receives the experiment
config from the coordinator (run config ``config-yaml`` + ``overrides``). It is the only input
the coordinator controls at the site, so it is checked before anything is read or built, against
the allowlist the coordinator checks its experiment with too (fedpanfm/federation/site_allowlist.py):

- run-config keys: only ``RUN_CONFIG_KEYS``; ``config-yaml`` must carry the config text
  (a site never reads the file ``config`` names: that would let the coordinator make it read any
  path and send the YAML error back);
- experiment keys that differ from the defaults: only those under ``SITE_SETTABLE`` take effect;
  those under ``SERVER_ONLY`` are the coordinator's own and are reset to the defaults at the
  site; any other key is refused with :class:`RunConfigRefused` naming it.
- paths come from the site's own config, through the node config ``site start`` writes:
  ``data-dir`` (the data) and ``cache-dir`` (the preprocessed-array cache, '' = inside the data
  folder).

In simulation (node config ``partition-id``) the ClientApp runs the coordinator's own config on
the coordinator's machine; no boundary is crossed and the config is used as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import yaml

from fedpanfm.config import ConfigError, ExperimentConfig, config_from_dict, config_from_run_config
from fedpanfm.federation.site_allowlist import RUN_CONFIG_KEYS, refusal, refused_settings, site_view
from sites.public_errors import PublicError

log = logging.getLogger(__name__)

#: Node-config key naming the site's preprocessed-array cache (from ``site.yaml`` ``cache_dir``).
NODE_CACHE_DIR = "cache-dir"
#: Node-config key of the site's in-RAM subject budget in MiB (``site.yaml`` ``memory_cache_mib``).
NODE_MEMORY_CACHE = "memory-cache-mib"


class RunConfigRefused(PublicError, ValueError):
    """The coordinator's run config sets something only the site may set; the message names the
    key and holds no site data, so it is sent back to the coordinator as it is."""


def is_deployed(node_config: Mapping[str, Any]) -> bool:
    """True for a deployed site's node (``site-name``), False for a simulated partition."""
    return "partition-id" not in node_config


def site_experiment_config(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> ExperimentConfig:
    """The experiment config a site trains with, from the coordinator's run config.

    Args:
        run_config: the run config the coordinator sent (``config``, ``overrides``,
            ``config-yaml``, ``run-folder``, ``resume``).
        node_config: the site's own node config (``site-name``, ``data-dir``, ``cache-dir``,
            ``memory-cache-mib``);
            a simulated partition (``partition-id``) uses the run config as it is.

    Raises:
        RunConfigRefused: a run-config key outside ``RUN_CONFIG_KEYS``, no ``config-yaml``,
            an invalid config, or an experiment key set outside ``SITE_SETTABLE`` /
            ``SERVER_ONLY`` (fedpanfm/federation/site_allowlist.py).
    """
    if not is_deployed(node_config):
        return config_from_run_config(run_config)
    unknown = sorted(str(k) for k in run_config if k not in RUN_CONFIG_KEYS)
    if unknown:
        raise RunConfigRefused(f"run config key {unknown[0]!r} is not accepted by sites "
                               f"(accepted: {', '.join(sorted(RUN_CONFIG_KEYS))})")
    if not run_config.get("config-yaml"):
        raise RunConfigRefused("run config has no 'config-yaml': a site takes the experiment config's text, "
                               "never a file path to read ('config' only labels it)")
    try:
        sent = config_from_run_config(run_config)
    except (ConfigError, ValueError, yaml.YAMLError) as exc:
        # The message quotes only what the coordinator sent (its keys and values).
        raise RunConfigRefused(f"the experiment config sent is invalid: {exc}") from None
    refused = refused_settings(sent)
    if refused:
        raise RunConfigRefused(f"run config {refusal(*refused[0])}")
    raw = site_view(sent)
    raw["data"]["cache_dir"] = str(node_config.get(NODE_CACHE_DIR, ""))
    if NODE_MEMORY_CACHE in node_config:
        raw["data"]["memory_cache_mib"] = node_config[NODE_MEMORY_CACHE]
    return config_from_dict(raw, f"{run_config.get('config', '')} (sent by the coordinator, site allowlist applied)")


__all__ = ["NODE_CACHE_DIR", "NODE_MEMORY_CACHE", "RunConfigRefused", "is_deployed", "site_experiment_config"]

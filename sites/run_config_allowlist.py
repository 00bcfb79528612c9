"""What the coordinator's run config may set at a site: an explicit allowlist.

A deployed site (node config naming ``site-name`` and ``data-dir``) receives the experiment
config from the coordinator (run config ``config-yaml`` + ``overrides``). It is the only input
the coordinator controls at the site, so it is checked before anything is read or built:

- run-config keys: only :data:`RUN_CONFIG_KEYS`; ``config-yaml`` must carry the config text
  (a site never reads the file ``config`` names: that would let the coordinator make it read any
  path and send the YAML error back);
- experiment keys that differ from the defaults: only those under :data:`SITE_SETTABLE`
  (training hyper-parameters, model, federation protocol) take effect; those under
  :data:`SERVER_ONLY` are the coordinator's own (its run folder, probe cohort, synthetic cohort)
  and are reset to the defaults at the site; any other key (paths, cache locations and switches,
  DeepSpeed passthrough ``deepspeed.extra``, DataLoader processes) is refused with
  :class:`RunConfigRefused` naming it. A key at its default value sets nothing, so a full config
  dump (a resumed run's ``config.yaml``) passes.
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
from sites.public_errors import PublicError

log = logging.getLogger(__name__)

#: Run-config keys a site accepts (``[tool.flwr.app.config]``).
RUN_CONFIG_KEYS = frozenset({"config", "overrides", "config-yaml", "run-folder", "resume"})

#: Experiment keys (dotted; a section allows every key below it) the coordinator may set at a site.
SITE_SETTABLE = (
    "seed", "device",
    "data.extra_organs", "data.organs", "data.on_bad", "data.batch_size", "data.val_fraction",
    "model", "train", "federation",
    "deepspeed.zero_stage", "deepspeed.bf16", "deepspeed.gradient_clipping", "deepspeed.gradient_accumulation_steps",
)

#: Experiment keys that are the coordinator's own: accepted, never applied at a site (reset to defaults).
SERVER_ONLY = ("name", "cohort", "synth", "logging", "evaluation")

#: Node-config key naming the site's preprocessed-array cache (from ``site.yaml`` ``cache_dir``).
NODE_CACHE_DIR = "cache-dir"


class RunConfigRefused(PublicError, ValueError):
    """The coordinator's run config sets something only the site may set; the message names the
    key and holds no site data, so it is sent back to the coordinator as it is."""


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value for every leaf of nested mappings (an empty mapping is no leaf)."""
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _under(key: str, sections: tuple[str, ...]) -> bool:
    return any(key == s or key.startswith(s + ".") for s in sections)


def is_deployed(node_config: Mapping[str, Any]) -> bool:
    """True for a deployed site's node (``site-name``), False for a simulated partition."""
    return "partition-id" not in node_config


def site_experiment_config(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> ExperimentConfig:
    """The experiment config a site trains with, from the coordinator's run config.

    Args:
        run_config: the run config the coordinator sent (``config``, ``overrides``,
            ``config-yaml``, ``run-folder``, ``resume``).
        node_config: the site's own node config (``site-name``, ``data-dir``, ``cache-dir``);
            a simulated partition (``partition-id``) uses the run config as it is.

    Raises:
        RunConfigRefused: a run-config key outside :data:`RUN_CONFIG_KEYS`, no ``config-yaml``,
            an invalid config, or an experiment key set outside :data:`SITE_SETTABLE` /
            :data:`SERVER_ONLY`.
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
    defaults = ExperimentConfig().to_dict()
    default_leaves = _leaves(defaults)
    missing = object()
    raw = sent.to_dict()
    for key, value in sorted(_leaves(raw).items()):
        if value == default_leaves.get(key, missing) or _under(key, SITE_SETTABLE) or _under(key, SERVER_ONLY):
            continue
        raise RunConfigRefused(
            f"run config sets {key} = {value!r}, which only the site's own config decides (paths, caches, "
            f"DeepSpeed passthrough, local processes); the coordinator may set: {', '.join(SITE_SETTABLE)}")
    for section in SERVER_ONLY:
        raw[section] = defaults[section]
    raw["data"]["cache_dir"] = str(node_config.get(NODE_CACHE_DIR, ""))
    return config_from_dict(raw, f"{run_config.get('config', '')} (sent by the coordinator, site allowlist applied)")


__all__ = ["NODE_CACHE_DIR", "RUN_CONFIG_KEYS", "RunConfigRefused", "SERVER_ONLY", "SITE_SETTABLE", "is_deployed",
           "site_experiment_config"]

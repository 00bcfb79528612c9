"""What the coordinator may set at a deployed site: one definition, enforced by every site and
checked by the coordinator before it submits a run.

A deployed site receives the experiment config from the coordinator (run config ``config-yaml``
+ ``overrides``). Sites apply it through this allowlist (sites/run_config_allowlist.py); the
coordinator checks its experiment against the same definition first (``fedpanfm federation
run``), so a key no site accepts fails at once, naming the key, instead of as every site's
refusal in round 1. Our design, per experiment key (dotted; a section covers every key below it):

- :data:`SITE_SETTABLE`: what the federation decides (training hyper-parameters, model,
  federation protocol, the organs and their preprocessing) arrives as sent;
- :data:`SERVER_ONLY`: the coordinator's own (its run folder, probe cohort, synthetic cohort,
  logging) is accepted and reset to the defaults at the site;
- anything else set to a non-default value is refused: paths, cache locations and switches,
  DeepSpeed passthrough (``deepspeed.extra``), local processes (``data.num_workers``): those
  come from the site's own ``site.yaml``. A key at its default value sets nothing, so a full
  config dump (a resumed run's ``config.yaml``) passes.

Run-config keys (``[tool.flwr.app.config]``) a site accepts: :data:`RUN_CONFIG_KEYS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedpanfm.config import ConfigError, ExperimentConfig

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


def refused_settings(cfg: ExperimentConfig) -> list[tuple[str, Any]]:
    """(dotted key, value) of every experiment key a site refuses, sorted by key; empty when
    every site accepts ``cfg``.

    Args:
        cfg: the experiment config as the coordinator would send it.
    """
    defaults = _leaves(ExperimentConfig().to_dict())
    missing = object()
    return [(key, value) for key, value in sorted(_leaves(cfg.to_dict()).items())
            if value != defaults.get(key, missing) and not _under(key, SITE_SETTABLE) and not _under(key, SERVER_ONLY)]


def refusal(key: str, value: Any) -> str:
    """Why a site refuses ``key = value``, with what the coordinator may set (shared wording)."""
    return (f"sets {key} = {value!r}, which only the site's own config decides (paths, caches, DeepSpeed "
            f"passthrough, local processes); the coordinator may set: {', '.join(SITE_SETTABLE)}")


def site_view(cfg: ExperimentConfig) -> dict[str, Any]:
    """``cfg`` as a dict with the coordinator's own sections (:data:`SERVER_ONLY`) at their defaults."""
    raw, defaults = cfg.to_dict(), ExperimentConfig().to_dict()
    for section in SERVER_ONLY:
        raw[section] = defaults[section]
    return raw


def check_sites_accept(cfg: ExperimentConfig, src: str) -> ExperimentConfig:
    """``cfg`` when every deployed site would accept it; :class:`ConfigError` naming the first
    refused key otherwise (the coordinator's check before it submits a run).

    Args:
        cfg: the experiment config (overrides applied).
        src: where it came from (the experiment YAML), for the message.
    """
    refused = refused_settings(cfg)
    if refused:
        key, value = refused[0]
        more = f" (and {', '.join(k for k, _ in refused[1:])})" if len(refused) > 1 else ""
        raise ConfigError(f"{src}: {refusal(key, value)}{more}; every deployed site would refuse this experiment "
                          "(fedpanfm/federation/site_allowlist.py): remove the key; a site sets its own in its site.yaml")
    return cfg


__all__ = ["RUN_CONFIG_KEYS", "SERVER_ONLY", "SITE_SETTABLE", "check_sites_accept", "refusal", "refused_settings",
           "site_view"]

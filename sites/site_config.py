"""The site kit's config: one YAML file per hospital (``sites/examples/hospital_a/site.yaml``).

Relative paths in the file are taken from the file's folder, so a site kit folder can be
moved as a whole. Loading checks every key (unknown keys, types, ranges) the way experiment
configs are checked; :meth:`SiteConfig.check_values` adds the checks across keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fedpanfm.certs import split_address
from fedpanfm.config import DataConfig, ExperimentConfig, load_config
from fedpanfm.site_names import check_site_name
from fedpanfm.typed_yaml import ConfigError, load_yaml_dataclass, option
from sites.approved_app import check_app_hash
from sites.cohort_statistics import NODE_MIN_CELL, NODE_SWITCH
from sites.run_config_allowlist import NODE_MEMORY_CACHE
from sites.step_curves import NODE_TB_DIR
from sites.worker.wire import check_socket_path


@dataclass
class SiteResources:
    """What the site's training may use on its machine."""

    cpus: int = option(0, lo=0, doc="CPU threads for training (OMP/torch threads); 0 = all")
    gpus: str = option("", doc="CUDA_VISIBLE_DEVICES for the ClientApp ('' = leave as is, 'none' = no GPU)")
    train_devices: int = option(0, lo=0, doc="devices a round's training uses, one DeepSpeed data-parallel process "
                                             "each (node config train-devices); 0 = the experiment's "
                                             "train.devices_per_site")


@dataclass
class SiteStatistics:
    """What the site releases to the server's cohort-statistics query (sites/cohort_statistics.py)."""

    share: bool = option(True, doc="answer the query with aggregates (node config cohort-statistics='on'); "
                                   "false declines it, training is unaffected")
    min_cell: int = option(0, lo=0, doc="this site's own least number of subjects behind any released value "
                                        "(node config statistics-min-cell); the largest of it, the server's ask, "
                                        "federation.statistics_min_cell and 5 applies; 0 = no floor of its own")


@dataclass
class SiteWorker:
    """The long-lived trainer worker ``site start`` runs beside the SuperNode (sites/worker/)."""

    enabled: bool = option(True, doc="run the worker (keeps the DeepSpeed engine across rounds); site start --no-worker overrides")
    state_dir: str = option("state", doc="folder (mode 0700) for the worker's socket and auth key; keep the path short")
    fallback: Literal["local", "fail"] = option("local", doc="when the worker does not answer: train in the ClientApp, or fail")

    def socket_path(self) -> Path:
        return Path(self.state_dir) / "trainer.sock"

    def key_path(self) -> Path:
        return Path(self.state_dir) / "trainer.key"


@dataclass
class SiteConfig:
    """One site's kit.

    Paths (``data_dir``, ``experiment``, ``ca_cert``, ``auth_key``, ``log_dir``) are relative to
    the YAML file's folder unless absolute; :func:`load_site_config` resolves them.
    """

    site_name: str = option("", doc="the site's name: as registered on the coordinator (certs init --sites)")
    data_dir: str = option("data", doc="the site folder: manifest.csv and the images it names")
    cache_dir: str = option("", doc="preprocessed-array cache ('' = <data_dir>/.fedpanfm_cache); the coordinator "
                                   "cannot set it (sites/run_config_allowlist.py)")
    memory_cache_mib: float = option(DataConfig.memory_cache_mib, lo=0.0,
                                     doc="preprocessed subjects kept in RAM per training process, MiB (0 = none); "
                                         "the coordinator cannot set it (data.memory_cache_mib)")
    organs: list[str] = option([], doc="organs this site holds; site check compares them with the data")
    experiment: str = option("", doc="the federation's experiment YAML (organ preprocessing); '' = defaults")
    coordinator: str = option("", doc="HOST:PORT of the coordinator's SuperLink")
    ca_cert: str = option("ca.crt", doc="the federation's CA certificate (PEM)")
    auth_key: str = option("auth.key", doc="this site's private auth key (OpenSSH EC), mode 0600")
    clientapp_port: int = option(9094, lo=1, hi=65535, doc="local port of the SuperNode's ClientApp API")
    log_dir: str = option("logs", doc="where site start writes the SuperNode log")
    tensorboard_dir: str = option("", doc="per-step training curves on this machine, <dir>/site_<name>/steps/ "
                                          "(node config tensorboard-dir); '' = none")
    approved_apps: list[str] = option([], doc="SHA-256 of each app bundle (FAB) this site runs (fedpanfm site "
                                              "approve-app --write); required: with none, site check and site "
                                              "start refuse, unless allow_any_app")
    allow_any_app: bool = option(False, doc="development only: run any app the coordinator sends (no approved_apps); "
                                            "never across institutions")
    resources: SiteResources = field(default_factory=SiteResources)
    statistics: SiteStatistics = field(default_factory=SiteStatistics)
    worker: SiteWorker = field(default_factory=SiteWorker)

    #: the YAML file this config came from ("" when built in code).
    source: str = ""

    def check_values(self) -> None:
        """Checks across keys; :class:`ConfigError` names the file and the key."""
        src = self.source or "<site config>"
        if not self.site_name:
            raise ConfigError(f"{src}: site_name is required")
        try:
            check_site_name(self.site_name, f"{src}: site_name")
            split_address(self.coordinator, f"{src}: coordinator")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        for key, value in (("data_dir", self.data_dir), ("cache_dir", self.cache_dir),
                           ("tensorboard_dir", self.tensorboard_dir), ("worker.state_dir", self.worker.state_dir)):
            if "'" in value:
                # The node config passes it as a TOML literal string, which cannot hold a quote.
                raise ConfigError(f"{src}: {key} {value!r} must not contain a single quote")
        for i, digest in enumerate(self.approved_apps):
            try:
                check_app_hash(digest, f"{src}: approved_apps[{i}]")
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if self.allow_any_app and self.approved_apps:
            raise ConfigError(f"{src}: allow_any_app: true and approved_apps contradict each other: remove "
                              "allow_any_app (the approved hashes are then enforced)")
        if self.worker.enabled:
            try:
                check_socket_path(self.worker.socket_path(), f"{src}: worker.state_dir")
            except ValueError as exc:
                raise ConfigError(str(exc)) from None

    def app_approval(self) -> str:
        """Which app bundles this site runs, one line; :class:`ConfigError` naming the file and
        the key when it approved none and did not opt out for development (deny by default)."""
        if self.approved_apps:
            return f"only app bundles with SHA-256 {', '.join(h[:12] + '...' for h in self.approved_apps)} run here"
        if self.allow_any_app:
            return ("allow_any_app: true: any app the coordinator sends runs here (development only; "
                    "`fedpanfm site approve-app --site-config <site.yaml> --write` pins a reviewed release)")
        raise ConfigError(f"{self.source or '<site config>'}: approved_apps is empty: this site approves no app, so it "
                          "does not start. Review the release checkout, then run `fedpanfm site approve-app "
                          f"--site-config {self.source or 'site.yaml'} --write` (its FAB hash is added to "
                          "approved_apps); for development only, `allow_any_app: true` runs any app")

    def experiment_config(self) -> ExperimentConfig:
        """The experiment config used to read this site's data (organ grids, bad-input policy)."""
        return load_config(self.experiment or None)

    def node_config(self, worker: bool = False) -> str:
        """The ``--node-config`` string telling the ClientApp which site and data to use, and what
        the site decided for itself: its statistics release (``cohort-statistics``,
        ``statistics-min-cell``), per-step curves (``tensorboard-dir``, when set) and training
        devices (``train-devices``, when set).

        Args:
            worker: also name the trainer worker (``trainer-socket``, ``trainer-key``,
                ``trainer-fallback``; sites/worker/), so the ClientApp forwards to it.
        """
        text = f"site-name='{self.site_name}' data-dir='{self.data_dir}'"
        if self.cache_dir:
            text += f" cache-dir='{self.cache_dir}'"
        if self.memory_cache_mib != DataConfig.memory_cache_mib:
            text += f" {NODE_MEMORY_CACHE}={self.memory_cache_mib}"
        stats = self.statistics
        text += f" {NODE_SWITCH}='{'on' if stats.share else 'off'}' {NODE_MIN_CELL}={stats.min_cell}"
        if self.tensorboard_dir:
            text += f" {NODE_TB_DIR}='{self.tensorboard_dir}'"
        if self.resources.train_devices:
            from sites.multi_device import NODE_DEVICES  # here: that module loads torch

            text += f" {NODE_DEVICES}={self.resources.train_devices}"
        if worker:
            w = self.worker
            text += f" trainer-socket='{w.socket_path()}' trainer-key='{w.key_path()}' trainer-fallback='{w.fallback}'"
        return text


def load_site_config(path: str | Path) -> SiteConfig:
    """Load and check a site YAML; relative paths are resolved against its folder.

    Args:
        path: the site YAML file.
    """
    path = Path(path)
    cfg = load_yaml_dataclass(SiteConfig, path)
    cfg.source = str(path)
    base = path.resolve().parent
    for name in ("data_dir", "ca_cert", "auth_key", "log_dir"):
        setattr(cfg, name, str(base / getattr(cfg, name)))
    if cfg.cache_dir:
        cfg.cache_dir = str(base / cfg.cache_dir)
    if cfg.tensorboard_dir:
        cfg.tensorboard_dir = str(base / cfg.tensorboard_dir)
    cfg.worker.state_dir = str(base / cfg.worker.state_dir)
    if cfg.experiment:
        cfg.experiment = str(base / cfg.experiment)
    cfg.check_values()
    return cfg

"""The coordinator: the Flower SuperLink with TLS, site authentication and persistent state.

Flower 1.41's SuperLink serves its Fleet API (SuperNodes), Control API (``flwr`` CLI) and
Runtime API (the ServerApp) over one HTTPS port. With ``--enable-supernode-auth`` only
SuperNodes whose public key was registered through the Control API (``flwr supernode
register``) may join; registration is kept in the ``--database`` file, so a restart keeps it.
The ServerApp runs in a process the SuperLink starts (default ``subprocess`` isolation); it
connects to Ray itself (``federation.ray.address``: "" a local Ray, ``auto`` / ``host:port`` a
cluster started with ``ray start --head``).

Life-cycle (our design, docs/deployment.md "Stop, crash, restart"): the SuperLink runs under a
keeper (fedpanfm/supervision.py) owned by ``fedpanfm server start``. The keeper is the child
subreaper of everything the SuperLink starts (SuperExec, ServerApp, Ray), records it in
``coordinator.pid`` and ends all of it when ``server start`` ends by any means, SIGKILL
included, or when the SuperLink exits. A new start ends whatever a killed keeper left (the
pid file) and binds the port with ``SO_REUSEADDR``, so a restart works at once.

The coordinator's files live under ``state_dir`` (config ``configs/deployment.yaml``)::

    state.db          SuperLink state (registered sites, runs)
    superlink.log     SuperLink log (+ the ServerApp's output)
    coordinator.pid   the running coordinator's processes (removed when it stops)
    flwr_home/        the Flower CLI config the coordinator uses to register sites
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from fedpanfm.certs import check_tls, load_auth_public_key, load_certificate
from fedpanfm.site_names import check_site_name
from fedpanfm.supervision import PidFile, ProcessRecord, clean_stale, keeper_command
from fedpanfm.typed_yaml import ConfigError, load_yaml_dataclass, option


@dataclass
class CoordinatorConfig:
    """The coordinator's deployment config; relative paths are from the YAML file's folder."""

    server_host: str = option("127.0.0.1", doc="the name sites and the flwr CLI dial (in the server certificate)")
    bind_host: str = option("0.0.0.0", doc="interface the SuperLink listens on")
    port: int = option(9092, lo=1, hi=65535, doc="the SuperLink's HTTPS port (Fleet, Control and Runtime APIs)")
    certs_dir: str = option("certs", doc="the folder `fedpanfm certs init` wrote")
    sites: dict[str, str] = option({}, doc="site name -> its public key file; '' = <certs_dir>/sites/<name>/auth.pub")
    state_dir: str = option("deploy", doc="state database, logs and the coordinator's Flower CLI config")
    experiment: str = option("configs/quickstart.yaml", doc="the experiment YAML `federation run` submits")
    overrides: list[str] = option([], doc="KEY=VALUE overrides of the experiment config")
    run_dir: str = option("runs", doc="run folders (checkpoints, TensorBoard) are made under this folder")
    connection: str = option("fedpanfm", doc="the Flower CLI connection name `federation run` writes")
    app_dir: str = option(".", doc="the Flower app (the project folder holding pyproject.toml)")

    source: str = ""

    # ------------------------------------------------------------ derived paths

    @property
    def address(self) -> str:
        return f"{self.server_host}:{self.port}"

    @property
    def ca_cert(self) -> Path:
        return Path(self.certs_dir) / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return Path(self.certs_dir) / "server.crt"

    @property
    def server_key(self) -> Path:
        return Path(self.certs_dir) / "server.key"

    @property
    def database(self) -> Path:
        return Path(self.state_dir) / "state.db"

    @property
    def log_file(self) -> Path:
        return Path(self.state_dir) / "superlink.log"

    @property
    def pid_file(self) -> Path:
        return Path(self.state_dir) / "coordinator.pid"

    @property
    def flwr_home(self) -> Path:
        return Path(self.state_dir) / "flwr_home"

    @property
    def registry(self) -> Path:
        """Site name -> the node id its key was registered under (``flwr supernode ls`` shows no names)."""
        return Path(self.state_dir) / "sites.json"

    def site_keys(self) -> dict[str, Path]:
        """Site name -> public key file, every name and file checked."""
        out = {}
        for name, key in self.sites.items():
            check_site_name(name, f"{self.source}: sites.{name}")
            out[name] = Path(key) if key else Path(self.certs_dir) / "sites" / name / "auth.pub"
        return out


def load_coordinator_config(path: str | Path) -> CoordinatorConfig:
    """Load ``configs/deployment.yaml``-style YAML; relative paths resolved against its folder.

    Args:
        path: the YAML file.
    """
    path = Path(path)
    cfg = load_yaml_dataclass(CoordinatorConfig, path)
    cfg.source = str(path)
    base = path.resolve().parent
    for name in ("certs_dir", "state_dir", "experiment", "run_dir", "app_dir"):
        setattr(cfg, name, str(base / getattr(cfg, name)))
    cfg.sites = {k: (str(base / v) if v else "") for k, v in cfg.sites.items()}
    if not cfg.sites:
        raise ConfigError(f"{path}: sites: name at least one site")
    try:
        cfg.site_keys()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return cfg


def check_files(cfg: CoordinatorConfig, insecure: bool = False) -> None:
    """Every certificate and site key the coordinator needs exists and parses."""
    if not insecure:
        load_certificate(cfg.ca_cert)
        load_certificate(cfg.server_cert)
        if not cfg.server_key.is_file():
            raise FileNotFoundError(f"{cfg.server_key}: server key not found (from {cfg.source}: certs_dir)")
    for name, key in cfg.site_keys().items():
        load_auth_public_key(key)


def superlink_command(cfg: CoordinatorConfig, insecure: bool = False) -> list[str]:
    """The ``flower-superlink`` command line.

    Args:
        cfg: the coordinator config.
        insecure: no TLS and so no site authentication (Flower refuses auth without TLS).
    """
    exe = shutil.which("flower-superlink")
    if exe is None:
        raise FileNotFoundError("flower-superlink not found on PATH: install the project (pip install -e .)")
    cmd = [exe, "--host", cfg.bind_host, "--port", str(cfg.port), "--database", str(cfg.database),
           "--disable-runtime-dependency-installation"]
    if insecure:
        return cmd + ["--insecure"]
    return cmd + ["--ssl-ca-certfile", str(cfg.ca_cert), "--ssl-certfile", str(cfg.server_cert),
                  "--ssl-keyfile", str(cfg.server_key), "--enable-supernode-auth"]


@contextmanager
def _flwr_home(home: Path) -> Iterator[None]:
    old = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(home)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = old


def write_flower_connection(home: Path, name: str, address: str, ca_cert: Path | None) -> Path:
    """Add (or replace) a SuperLink connection in the Flower CLI config and make it the default.

    Flower's own writer is used, so the file is what ``flwr`` expects:
    ``[superlink.<name>] address = ... root-certificates = ...`` in ``<home>/config.toml``.

    Args:
        home: the Flower home folder (``FLWR_HOME``; ``~/.flwr`` by default for users).
        name: the connection name.
        address: ``host:port`` of the SuperLink.
        ca_cert: the CA certificate; None means an insecure connection.
    """
    from flwr.cli.flower_config import set_default_superlink_connection, write_superlink_connection
    from flwr.cli.typing import SuperLinkConnection

    home.mkdir(parents=True, exist_ok=True)
    with _flwr_home(home):
        conn = SuperLinkConnection(name=name, address=address,
                                   root_certificates=str(Path(ca_cert).resolve()) if ca_cert else None,
                                   insecure=True if ca_cert is None else None)
        write_superlink_connection(conn)
        set_default_superlink_connection(name)
    return home / "config.toml"


def flwr_env(home: Path) -> dict[str, str]:
    """The environment for a ``flwr`` CLI call using the Flower home ``home``."""
    return {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def _flwr(args: list[str], home: Path, timeout_s: float) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("flwr")
    if exe is None:
        raise FileNotFoundError("flwr not found on PATH: install the project (pip install -e .)")
    return subprocess.run([exe, *args], env=flwr_env(home), capture_output=True, text=True, timeout=timeout_s)


def register_sites(cfg: CoordinatorConfig, timeout_s: float = 60.0) -> dict[str, str]:
    """Register every configured site's public key with the running SuperLink.

    A key the SuperLink already holds (a restart with the same ``state.db``) is left as is.
    Returns site name -> ``"registered"`` or ``"already registered"``.

    Args:
        cfg: the coordinator config.
        timeout_s: per ``flwr`` call.
    """
    write_flower_connection(cfg.flwr_home, cfg.connection, cfg.address, cfg.ca_cert)
    out = {}
    registry = read_registry(cfg)
    for name, key in cfg.site_keys().items():
        load_auth_public_key(key)
        res = _flwr(["supernode", "register", str(key), cfg.connection, "--name", name, "--format", "json"],
                    cfg.flwr_home, timeout_s)
        text = res.stdout + res.stderr
        node = re.search(r'"node-id":\s*(\d+)', text)
        if res.returncode == 0 and '"success": true' in text:
            out[name] = "registered" + (f" as node {node.group(1)}" if node else "")
            if node:
                registry[name] = {"node_id": int(node.group(1)), "public_key": str(key)}
                _write_registry(cfg, registry)
        elif "already" in text.lower():
            out[name] = "already registered"
        else:
            raise RuntimeError(f"site {name}: registering {key} failed ({res.returncode}): {text[-2000:]}")
    return out


def read_registry(cfg: CoordinatorConfig) -> dict[str, dict[str, object]]:
    """``<state_dir>/sites.json``: site name -> ``{"node_id", "public_key"}`` as registered here."""
    if not cfg.registry.is_file():
        return {}
    try:
        data = json.loads(cfg.registry.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{cfg.registry}: not valid JSON ({exc}); remove it and register again") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{cfg.registry}: expected an object of sites")
    return data


def _write_registry(cfg: CoordinatorConfig, registry: dict[str, dict[str, object]]) -> None:
    tmp = cfg.registry.with_suffix(".tmp")
    tmp.write_text(json.dumps(registry, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, cfg.registry)


def unregister_site(cfg: CoordinatorConfig, name: str, timeout_s: float = 60.0) -> int:
    """Unregister ``name``'s node from the running SuperLink; its key is refused from then on.

    Returns the node id. The site stays in ``sites`` until the operator drops it (a restart
    would register it again).

    Args:
        cfg: the coordinator config.
        name: the site name.
        timeout_s: for the ``flwr`` call.
    """
    check_site_name(name, "server unregister --site")
    registry = read_registry(cfg)
    if name not in registry:
        raise ValueError(f"site {name}: no node id recorded in {cfg.registry} (registered before this record was "
                         f"kept?): find it with `FLWR_HOME={cfg.flwr_home} flwr supernode ls {cfg.connection}` and run "
                         f"`flwr supernode unregister <node-id> {cfg.connection}`")
    node_id = int(str(registry[name]["node_id"]))
    write_flower_connection(cfg.flwr_home, cfg.connection, cfg.address, cfg.ca_cert)
    res = _flwr(["supernode", "unregister", str(node_id), cfg.connection, "--format", "json"], cfg.flwr_home, timeout_s)
    text = res.stdout + res.stderr
    if res.returncode != 0 or '"success": true' not in text:
        raise RuntimeError(f"site {name}: unregistering node {node_id} failed ({res.returncode}): {text[-2000:]}")
    del registry[name]
    _write_registry(cfg, registry)
    return node_id


def ensure_port_free(host: str, port: int) -> None:
    """Raise if ``host:port`` cannot be bound: another SuperLink (or anything) holds it, and a
    readiness check would otherwise be answered by that other server.

    ``SO_REUSEADDR``, as the SuperLink's own server binds: connections of a stopped SuperLink
    left in TIME_WAIT (about a minute) do not hold the port, only a listening socket does.
    """
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise OSError(f"coordinator port {host}:{port} is in use ({exc}); stop what holds it or "
                          "change `port` in the coordinator config") from None


def wait_until_serving(cfg: CoordinatorConfig, proc: subprocess.Popen[bytes] | None, timeout_s: float = 60.0,
                       insecure: bool = False) -> None:
    """Wait until the SuperLink accepts connections (a TLS handshake with the CA, or TCP).

    Args:
        cfg: the coordinator config.
        proc: the SuperLink process; its exit ends the wait with an error.
        timeout_s: how long to wait.
        insecure: check a plain TCP connection instead of TLS.
    """
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with {proc.returncode}; see {cfg.log_file}")
        try:
            if insecure:
                socket.create_connection((cfg.server_host, cfg.port), timeout=2.0).close()
            else:
                check_tls(cfg.address, cfg.ca_cert, timeout_s=2.0)
            if proc is not None and proc.poll() is not None:
                continue  # it answered, but it died meanwhile: report the exit above
            return
        except (ConnectionError, OSError) as exc:
            last = exc
            time.sleep(0.3)
    raise TimeoutError(f"SuperLink {cfg.address} not serving after {timeout_s:.0f} s ({last}); see {cfg.log_file}")


@dataclass
class SuperLinkProcess:
    """A started SuperLink under its keeper (fedpanfm/supervision.py).

    Args:
        proc: the keeper process; its stdin is the pipe whose closing ends the coordinator's
            whole process tree.
        log_file: the SuperLink's log file.
        pid_file: where the keeper records the tree.
        registered: site name -> registration outcome.
        cleaned: processes a previous, killed coordinator had left running, ended at start.
    """

    proc: subprocess.Popen[bytes]
    log_file: Path
    pid_file: Path
    registered: dict[str, str] = field(default_factory=dict)
    cleaned: list[ProcessRecord] = field(default_factory=list)

    def superlink_pid(self, timeout_s: float = 10.0) -> int | None:
        """The ``flower-superlink`` PID from the pid file (None if not recorded within ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                recorded = PidFile(self.pid_file).read()
            except ValueError:
                recorded = None
            for rec in recorded[2] if recorded else []:
                if "superlink" in rec.name:
                    return rec.pid
            time.sleep(0.2)
        return None

    def request_stop(self) -> None:
        """Ask the keeper to end the tree (returns at once; safe in a signal handler)."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def stop(self, timeout_s: float = 40.0) -> int:
        """End the coordinator: the keeper TERMs the tree (KILL after its grace); its exit code."""
        self.request_stop()
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # the keeper hung; the next start ends the rest from the pid file
            return self.proc.wait(timeout=10)


def start_superlink(cfg: CoordinatorConfig, insecure: bool = False, ready_timeout_s: float = 60.0,
                    grace_s: float = 10.0) -> SuperLinkProcess:
    """End what a killed coordinator left, start the SuperLink under a keeper, wait until it
    serves, register the sites (secure mode).

    Args:
        cfg: the coordinator config.
        insecure: no TLS, no authentication (testing only; the caller warns).
        ready_timeout_s: how long to wait for the SuperLink to serve.
        grace_s: SIGTERM grace the keeper gives each process when the coordinator stops.

    Raises:
        AlreadyRunning: a coordinator is running on the same ``state_dir``.
    """
    check_files(cfg, insecure)
    Path(cfg.state_dir).mkdir(parents=True, exist_ok=True)
    cleaned = clean_stale(PidFile(cfg.pid_file), "coordinator")
    ensure_port_free(cfg.bind_host, cfg.port)
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    cmd = keeper_command(superlink_command(cfg, insecure), cfg.pid_file, os.getpid(), grace_s)
    with open(cfg.log_file, "ab") as log:
        # Its own session: a Ctrl-C in the terminal reaches `server start` only, which then
        # stops the keeper in order.
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    link = SuperLinkProcess(proc, cfg.log_file, cfg.pid_file, cleaned=cleaned)
    try:
        wait_until_serving(cfg, proc, ready_timeout_s, insecure)
        if not insecure:
            link.registered = register_sites(cfg)
    except BaseException:
        link.stop()
        raise
    return link

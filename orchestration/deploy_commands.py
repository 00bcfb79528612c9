"""``fedpanfm server start|register`` and ``fedpanfm federation run`` (CLI plugins).

``server start`` runs the coordinator's SuperLink in the foreground (orchestration/coordinator.py).
``federation run`` writes the Flower CLI connection the user needs and submits the run with
``flwr run APP CONNECTION``: the experiment YAML travels inside the run config
(``config-yaml``), because the sites share no filesystem with the coordinator.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from fedpanfm.config import load_config
from orchestration.coordinator import (
    CoordinatorConfig,
    flwr_env,
    load_coordinator_config,
    register_sites,
    start_superlink,
    write_flower_connection,
)


def register_server(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``server`` subcommand (``start``, ``register``).

    Args:
        subparsers: the ``fedpanfm`` command's subparsers.
    """
    server = subparsers.add_parser("server", help="the coordinator of a deployed federation")
    sub = server.add_subparsers(dest="server_command", metavar="ACTION", required=True)
    start = sub.add_parser("start", help="run the SuperLink (TLS, site authentication, state database)")
    start.add_argument("--config", required=True, type=Path, help="coordinator YAML (configs/deployment.yaml)")
    start.add_argument("--insecure", action="store_true",
                       help="no TLS and no site authentication: any machine that reaches the port may join. "
                       "Testing on one machine only")
    start.set_defaults(func=_run_server_start)
    reg = sub.add_parser("register", help="register the sites' public keys with the running SuperLink")
    reg.add_argument("--config", required=True, type=Path, help="coordinator YAML")
    reg.set_defaults(func=_run_server_register)


def register_federation(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``federation`` subcommand (``run``).

    Args:
        subparsers: the ``fedpanfm`` command's subparsers.
    """
    fed = subparsers.add_parser("federation", help="submit runs to a deployed federation")
    sub = fed.add_subparsers(dest="federation_command", metavar="ACTION", required=True)
    run = sub.add_parser("run", help="write the Flower CLI connection and submit a run (flwr run)")
    run.add_argument("--config", required=True, type=Path, help="coordinator YAML (configs/deployment.yaml)")
    run.add_argument("--experiment", type=Path, default=None,
                     help="experiment YAML (default: the coordinator config's `experiment`)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override an experiment config key, e.g. --set federation.rounds=5 (repeatable)")
    run.add_argument("--flwr-home", type=Path, default=None,
                     help="Flower CLI home to write the connection into (default: $FLWR_HOME or ~/.flwr)")
    run.add_argument("--run-folder", type=Path, default=None,
                     help="the run folder on the coordinator (default: <run_dir>/<name>-<timestamp>)")
    run.add_argument("--stream", action="store_true", help="follow the run's log until it ends")
    run.add_argument("--timeout", type=float, default=None, help="with --stream: give up after this many seconds")
    run.set_defaults(func=_run_federation)


# --------------------------------------------------------------------------- server


def _run_server_start(args: argparse.Namespace) -> int:
    cfg = load_coordinator_config(args.config)
    if args.insecure:
        print("WARNING: --insecure: the SuperLink runs without TLS and without site authentication; "
              "traffic is readable and any machine that reaches the port can join. Testing only.",
              file=sys.stderr, flush=True)
    link = start_superlink(cfg, insecure=args.insecure)
    # Only signal here: waiting inside a handler would re-enter the main thread's wait().
    signal.signal(signal.SIGTERM, lambda *_: link.proc.terminate())
    print(f"SuperLink serving on {cfg.bind_host}:{cfg.port} (sites dial {cfg.address}); pid {link.proc.pid}")
    print(f"  log: {link.log_file}")
    print(f"  state database: {cfg.database}")
    for name, status in link.registered.items():
        print(f"  site {name}: {status}")
    print(f"  runs write under {cfg.run_dir} (submit with: fedpanfm federation run --config {args.config})",
          flush=True)
    try:
        return link.proc.wait()
    except KeyboardInterrupt:
        link.stop()
        return 0
    finally:
        link.stop()


def _run_server_register(args: argparse.Namespace) -> int:
    cfg = load_coordinator_config(args.config)
    for name, status in register_sites(cfg).items():
        print(f"site {name}: {status}")
    return 0


# --------------------------------------------------------------------------- federation run


def _toml_str(value: str) -> str:
    # JSON string escapes are a subset of TOML basic-string escapes.
    return json.dumps(value)


def write_run_config(path: Path, experiment: Path, overrides: list[str], run_folder: Path) -> Path:
    """The TOML file ``flwr run --run-config`` reads: the keys of ``[tool.flwr.app.config]``.

    Args:
        path: the TOML file to write.
        experiment: the experiment YAML (its text is sent as ``config-yaml``).
        overrides: ``KEY=VALUE`` overrides (checked here against the experiment config).
        run_folder: where the ServerApp writes, on the coordinator.
    """
    load_config(experiment, overrides)  # a bad experiment config fails here, not on the coordinator
    values = {"config": str(experiment), "overrides": shlex.join(overrides),
              "run-folder": str(run_folder), "config-yaml": experiment.read_text()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{json.dumps(k)} = {_toml_str(v)}\n" for k, v in values.items()))
    return path


def submit_run(cfg: CoordinatorConfig, experiment: Path, overrides: list[str], flwr_home: Path,
               run_folder: Path | None = None, stream: bool = False, timeout_s: float | None = None) -> dict[str, str]:
    """Write the Flower CLI connection into ``flwr_home`` and submit the run; what was done.

    Args:
        cfg: the coordinator config (address, CA, connection name, app folder, run_dir).
        experiment: the experiment YAML.
        overrides: ``KEY=VALUE`` overrides.
        flwr_home: the Flower CLI home (``FLWR_HOME``).
        run_folder: the run folder on the coordinator (default ``<run_dir>/<name>-<timestamp>``).
        stream: follow the log until the run ends.
        timeout_s: with ``stream``, the longest wait.
    """
    exp_cfg = load_config(experiment, overrides)
    if run_folder is None:
        run_folder = Path(cfg.run_dir) / f"{exp_cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    conn_file = write_flower_connection(flwr_home, cfg.connection, cfg.address, cfg.ca_cert)
    run_cfg = write_run_config(flwr_home / "fedpanfm_runs" / f"{run_folder.name}.toml", experiment.resolve(),
                               overrides, run_folder.resolve())
    cmd = ["flwr", "run", cfg.app_dir, cfg.connection, "--run-config", str(run_cfg)]
    if stream:
        cmd.append("--stream")
    # `flwr run` (1.41) "migrates" a [tool.flwr.federations] section of the app's pyproject.toml
    # into FLWR_HOME and comments it out in place; our connection is written explicitly above,
    # so the project's file is put back as it was.
    pyproject = Path(cfg.app_dir) / "pyproject.toml"
    before = pyproject.read_bytes() if pyproject.is_file() else None
    try:
        res = subprocess.run(cmd, env=flwr_env(flwr_home), cwd=cfg.app_dir, timeout=timeout_s,
                             capture_output=not stream, text=True)
    finally:
        if before is not None and pyproject.read_bytes() != before:
            pyproject.write_bytes(before)
    if res.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({res.returncode}): {(res.stdout or '')[-2000:]} "
                           f"{(res.stderr or '')[-2000:]}")
    return {"connection": str(conn_file), "run_config": str(run_cfg), "run_folder": str(run_folder),
            "output": res.stdout or ""}


def _run_federation(args: argparse.Namespace) -> int:
    cfg = load_coordinator_config(args.config)
    experiment = args.experiment or Path(cfg.experiment)
    overrides = [*cfg.overrides, *args.overrides]
    home = args.flwr_home or Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")
    done = submit_run(cfg, experiment, overrides, home, args.run_folder, args.stream, args.timeout)
    print(done["output"], end="")
    print(f"Flower CLI connection {cfg.connection!r} written to {done['connection']} (flwr ls {cfg.connection})")
    print(f"run config: {done['run_config']}")
    print(f"run folder on the coordinator: {done['run_folder']} (checkpoints/, tensorboard/, summary.json)")
    return 0

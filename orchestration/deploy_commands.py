"""``fedpanfm server start|register`` and ``fedpanfm federation run`` (CLI plugins).

``server start`` runs the coordinator's SuperLink in the foreground (orchestration/coordinator.py);
whatever way it ends, nothing it started keeps running (fedpanfm/supervision.py).
``federation run`` writes the Flower CLI connection the user needs and submits the run with
``flwr run APP CONNECTION``: the experiment YAML travels inside the run config
(``config-yaml``), because the sites share no filesystem with the coordinator; an experiment
that sets a key outside the sites' allowlist (fedpanfm/federation/site_allowlist.py) is refused
before anything is submitted. It prints the run
folder at once, follows the run's log and ends with fedpanfm's summary; ``--resume RUN_DIR``
continues a run after its last complete checkpoint (orchestration/resume.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fedpanfm.cli import add_file_option
from fedpanfm.config import ConfigError, config_from_dict, load_config
from fedpanfm.federation.site_allowlist import check_sites_accept
from fedpanfm.supervision import AlreadyRunning
from orchestration.coordinator import (
    CoordinatorConfig,
    flwr_env,
    load_coordinator_config,
    register_sites,
    start_superlink,
    unregister_site,
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
    add_file_option(start, "--coordinator-config", "coordinator YAML (configs/deployment.yaml)")
    start.add_argument("--insecure", action="store_true",
                       help="no TLS and no site authentication: any machine that reaches the port may join. "
                       "Testing on one machine only")
    start.set_defaults(func=_run_server_start)
    reg = sub.add_parser("register", help="register the sites' public keys with the running SuperLink")
    add_file_option(reg, "--coordinator-config", "coordinator YAML")
    reg.set_defaults(func=_run_server_register)
    unreg = sub.add_parser("unregister", help="unregister a site's node (remove a site, or before rotating its key)")
    add_file_option(unreg, "--coordinator-config", "coordinator YAML")
    unreg.add_argument("--site", required=True, help="the site name")
    unreg.set_defaults(func=_run_server_unregister)


def register_federation(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``federation`` subcommand (``run``).

    Args:
        subparsers: the ``fedpanfm`` command's subparsers.
    """
    fed = subparsers.add_parser("federation", help="submit runs to a deployed federation")
    sub = fed.add_subparsers(dest="federation_command", metavar="ACTION", required=True)
    run = sub.add_parser("run", help="write the Flower CLI connection and submit a run (flwr run)")
    add_file_option(run, "--coordinator-config", "coordinator YAML (configs/deployment.yaml)")
    run.add_argument("--experiment", type=Path, default=None,
                     help="experiment YAML (default: the coordinator config's `experiment`)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override an experiment config key, e.g. --set federation.rounds=5 (repeatable)")
    run.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                     help="continue this run folder after its last complete checkpoint, with its own config.yaml "
                     "(no --experiment, --set or --run-folder)")
    run.add_argument("--flwr-home", type=Path, default=None,
                     help="Flower CLI home to write the connection into (default: $FLWR_HOME or ~/.flwr)")
    run.add_argument("--run-folder", type=Path, default=None,
                     help="the run folder on the coordinator (default: <run_dir>/<name>-<timestamp>)")
    run.add_argument("--detach", action="store_true",
                     help="return once the run is submitted instead of following it to its summary")
    run.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for scripts
    run.add_argument("--timeout", type=float, default=None, help="stop following the run after this many seconds")
    run.set_defaults(func=_run_federation)


# --------------------------------------------------------------------------- server


def _run_server_start(args: argparse.Namespace) -> int:
    cfg = load_coordinator_config(args.config)
    if args.insecure:
        print("WARNING: --insecure: the SuperLink runs without TLS and without site authentication; "
              "traffic is readable and any machine that reaches the port can join. Testing only.",
              file=sys.stderr, flush=True)
    try:
        link = start_superlink(cfg, insecure=args.insecure)
    except (AlreadyRunning, OSError, RuntimeError, TimeoutError) as exc:
        # Expected conditions (port taken, a coordinator already running, SuperLink failed to
        # start): one line, no traceback; the log says the rest.
        print(f"fedpanfm server start: {exc}", file=sys.stderr)
        return 1
    stopping = False

    def on_signal(*_: object) -> None:
        nonlocal stopping
        stopping = True
        link.request_stop()  # only signal here: waiting would re-enter the main thread's wait()

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    for rec in link.cleaned:
        print(f"  ended {rec.name} (pid {rec.pid}), left running by a coordinator that was killed")
    print(f"SuperLink serving on {cfg.bind_host}:{cfg.port} (sites dial {cfg.address}); "
          f"coordinator pid {os.getpid()}, SuperLink pid {link.superlink_pid()}")
    print(f"  log: {link.log_file}")
    print(f"  state database: {cfg.database}; processes: {cfg.pid_file}")
    for name, status in link.registered.items():
        print(f"  site {name}: {status}")
    print(f"  runs write under {cfg.run_dir} (submit with: fedpanfm federation run --coordinator-config {args.config})",
          flush=True)
    try:
        code = link.proc.wait()
    except KeyboardInterrupt:
        stopping = True
        code = 0
    finally:
        link.stop()
    if stopping:
        print("coordinator stopped", flush=True)
        return 0
    print(f"fedpanfm server start: the SuperLink exited ({code}); the coordinator stopped everything it "
          f"had started. See {link.log_file}", file=sys.stderr, flush=True)
    return code or 1


def _run_server_register(args: argparse.Namespace) -> int:
    cfg = load_coordinator_config(args.config)
    for name, status in register_sites(cfg).items():
        print(f"site {name}: {status}")
    return 0


def _run_server_unregister(args: argparse.Namespace) -> int:
    cfg = load_coordinator_config(args.config)
    try:
        node_id = unregister_site(cfg, args.site)
    except (ValueError, RuntimeError) as exc:
        print(f"fedpanfm server unregister: {exc}", file=sys.stderr)
        return 1
    print(f"site {args.site}: node {node_id} unregistered; its key is refused from now on"
          + (f" (still listed in {args.config} `sites`: a restart or `server register` registers it again)"
             if args.site in cfg.sites else ""))
    return 0


# --------------------------------------------------------------------------- federation run


def _toml_str(value: str) -> str:
    # JSON string escapes are a subset of TOML basic-string escapes.
    return json.dumps(value)


def write_run_config(path: Path, experiment: Path, overrides: list[str], run_folder: Path,
                     resume: bool = False) -> Path:
    """The TOML file ``flwr run --run-config`` reads: the keys of ``[tool.flwr.app.config]``.

    Args:
        path: the TOML file to write.
        experiment: the experiment YAML (its text is sent as ``config-yaml``); with ``resume``
            the run folder's own ``config.yaml``.
        overrides: ``KEY=VALUE`` overrides (checked here against the experiment config).
        run_folder: where the ServerApp writes, on the coordinator.
        resume: continue ``run_folder`` (run config ``resume``) instead of starting it.
    """
    # A bad experiment config, or one that sets a key no site accepts, fails here, not on the coordinator.
    check_sites_accept(load_config(experiment, overrides), str(experiment))
    values = {"config": str(experiment), "overrides": shlex.join(overrides),
              "run-folder": str(run_folder), "config-yaml": experiment.read_text()}
    if resume:
        values["resume"] = str(run_folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{json.dumps(k)} = {_toml_str(v)}\n" for k, v in values.items()))
    return path


def check_resumable(run_folder: Path) -> str:
    """Why ``run_folder`` can be resumed (one line), or :class:`ValueError` saying why not.

    Args:
        run_folder: a run folder on the coordinator.
    """
    from fedpanfm.checkpoint import CheckpointError  # torch: not at CLI start-up
    from orchestration.resume import find_resume_point, resume_config

    config = run_folder / "config.yaml"
    if not config.is_file():
        raise ValueError(f"--resume {run_folder}: no config.yaml there (not a run folder)")
    try:
        point = find_resume_point(run_folder)
        # What is sent to the sites is config.yaml: it must be the checkpoint's checksummed config.
        rounds = config_from_dict(resume_config(run_folder, point), str(config)).federation.rounds
    except CheckpointError as exc:
        raise ValueError(f"--resume {run_folder}: {exc}") from None
    summary = run_folder / "summary.json"
    if point.round >= rounds:
        raise ValueError(f"--resume {run_folder}: round {point.round} of {rounds} is its last checkpoint: "
                         "the run is complete" + (f" (see {summary})" if summary.is_file() else ""))
    skipped = f"; skipped {len(point.skipped)} newer checkpoint(s) that failed verification" if point.skipped else ""
    return f"resuming {run_folder} after round {point.round} of {rounds} ({point.path}){skipped}"


def default_run_folder(cfg: CoordinatorConfig, name: str) -> Path:
    """``<run_dir>/<name>-federation-<YYYYmmdd-HHMMSS>`` on the coordinator (fedpanfm/run_folder.py)."""
    from fedpanfm.run_folder import new_run_folder

    return new_run_folder(cfg.run_dir, name, "federation")


def _flwr_command(cfg: CoordinatorConfig, run_cfg: Path, stream: bool) -> list[str]:
    cmd = ["flwr", "run", cfg.app_dir, cfg.connection, "--run-config", str(run_cfg)]
    return cmd + ["--stream"] if stream else cmd


class _KeepPyproject:
    """Put the app's ``pyproject.toml`` back as it was should ``flwr run`` rewrite it.

    ``flwr run`` (1.41) "migrates" a ``[tool.flwr.federations]`` section into ``FLWR_HOME`` and
    comments it out in place (flwr/cli/config_migration.py). Ours has none any more, but an app
    folder from an older checkout may: the operator's file is never left changed.
    """

    def __init__(self, app_dir: str) -> None:
        self.path = Path(app_dir) / "pyproject.toml"
        self.before = self.path.read_bytes() if self.path.is_file() else None

    def __enter__(self) -> "_KeepPyproject":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.before is not None and self.path.read_bytes() != self.before:
            self.path.write_bytes(self.before)


def follow(cmd: list[str], env: dict[str, str], cwd: str, log_path: Path, timeout_s: float | None,
           echo: Any = None, verbose: bool = False) -> tuple[int, str]:
    """Run ``flwr run --stream``: write all its lines to ``log_path``, echo what the operator
    reads (orchestration/run_stream.py: fedpanfm's per-round lines, warnings and errors); (exit
    code, the last line of a Python traceback it printed, or "").

    A traceback (e.g. the coordinator went away under the stream) is written to the log only:
    the caller prints one line and the log path. Echoing resumes after it.

    Args:
        cmd: the command.
        env: its environment.
        cwd: its working folder.
        log_path: the full output (appended).
        timeout_s: stop following after this long (the run itself goes on); None: until it ends.
        echo: where lines are printed (default ``sys.stdout``).
        verbose: echo every line.
    """
    from orchestration.run_stream import StreamView

    echo = echo or sys.stdout
    view = StreamView()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    in_traceback, last_error = False, ""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log, subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE,
                                                     stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        timer = None
        if deadline is not None:
            timer = threading.Timer(timeout_s, proc.terminate)  # type: ignore[arg-type]
            timer.daemon = True
            timer.start()
        for line in proc.stdout:
            log.write(line)
            if line.startswith("Traceback (most recent call last)"):
                in_traceback = True
                continue
            if in_traceback:
                if line.strip() and not line.startswith((" ", "\t")):
                    last_error, in_traceback = line.strip(), False  # the exception line closes a traceback
                continue
            shown = line if verbose else view(line)
            if shown is not None:
                echo.write(shown)
                echo.flush()
        code = proc.wait()
        if timer is not None:
            timer.cancel()
    return code, last_error


def submit_run(cfg: CoordinatorConfig, experiment: Path, overrides: list[str], flwr_home: Path,
               run_folder: Path | None = None, stream: bool = False, timeout_s: float | None = None,
               resume: bool = False, verbose: bool = False) -> dict[str, Any]:
    """Write the Flower CLI connection into ``flwr_home`` and submit the run; what was done.

    Args:
        cfg: the coordinator config (address, CA, connection name, app folder, run_dir).
        experiment: the experiment YAML (with ``resume``: the run folder's ``config.yaml``).
        overrides: ``KEY=VALUE`` overrides.
        flwr_home: the Flower CLI home (``FLWR_HOME``).
        run_folder: the run folder on the coordinator (default ``<run_dir>/<name>-<timestamp>``).
        stream: follow the log until the run ends (its lines are printed and kept in
            ``<run folder>/federation_run.log``).
        timeout_s: the longest wait (submission, or following with ``stream``).
        resume: continue ``run_folder`` after its last complete checkpoint.
        verbose: with ``stream``, print every line of the log, not only fedpanfm's lines,
            warnings and errors.

    Raises:
        RuntimeError: ``flwr run`` failed (the message ends with its output's last lines).
    """
    if run_folder is None:
        run_folder = default_run_folder(cfg, load_config(experiment, overrides).name)
    conn_file = write_flower_connection(flwr_home, cfg.connection, cfg.address, cfg.ca_cert)
    run_cfg = write_run_config(flwr_home / "fedpanfm_runs" / f"{run_folder.name}.toml", experiment.resolve(),
                               overrides, run_folder.resolve(), resume=resume)
    cmd = _flwr_command(cfg, run_cfg, stream)
    log_path = run_folder / "federation_run.log"
    done = {"connection": str(conn_file), "run_config": str(run_cfg), "run_folder": str(run_folder),
            "log": str(log_path), "output": "", "error": ""}
    with _KeepPyproject(cfg.app_dir):
        if stream:
            code, done["error"] = follow(cmd, flwr_env(flwr_home), cfg.app_dir, log_path, timeout_s,
                                         verbose=verbose)
        else:
            res = subprocess.run(cmd, env=flwr_env(flwr_home), cwd=cfg.app_dir, timeout=timeout_s,
                                 capture_output=True, text=True)
            code, done["output"] = res.returncode, (res.stdout or "") + (res.stderr or "")
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a") as log:
                log.write(done["output"])
    if code != 0:
        tail = done["error"] or _last_line(done["output"])
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({code}): {tail}; log: {log_path}")
    return done


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def _run_federation(args: argparse.Namespace) -> int:
    from fedpanfm.run_folder import record_provenance
    from orchestration.resume import resume_command
    from orchestration.server_app import summary_text

    cfg = load_coordinator_config(args.config)
    home = args.flwr_home or Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")
    if args.resume is not None:
        if args.experiment or args.overrides or args.run_folder:
            raise ConfigError("federation run --resume: the run continues with its own config.yaml and "
                              "folder; drop --experiment, --set and --run-folder")
        run_folder = args.resume.resolve()
        print(check_resumable(run_folder), flush=True)
        experiment, overrides = run_folder / "config.yaml", []
        experiment_cfg = load_config(experiment)
    else:
        experiment = args.experiment or Path(cfg.experiment)
        overrides = [*cfg.overrides, *args.overrides]
        experiment_cfg = load_config(experiment, overrides)
        run_folder = (args.run_folder or default_run_folder(cfg, experiment_cfg.name)).resolve()
    # Before anything is written or submitted: every site would refuse a key outside its allowlist.
    check_sites_accept(experiment_cfg, str(experiment))
    print(f"run folder on the coordinator: {run_folder} (checkpoints/, tensorboard/, summary.json)", flush=True)
    # The operator's command, beside what the ServerApp records of itself (orchestration/deployed_run.py).
    record_provenance(run_folder, experiment_cfg.device)
    summary_path = run_folder / "summary.json"
    before = summary_path.stat().st_mtime_ns if summary_path.is_file() else None
    follow_run = not args.detach
    try:
        done = submit_run(cfg, experiment, overrides, home, run_folder, stream=follow_run, timeout_s=args.timeout,
                          resume=args.resume is not None, verbose=bool(getattr(args, "verbose", False)))
    except KeyboardInterrupt:
        print(f"\nfedpanfm federation run: stopped following; the run goes on (flwr ls {cfg.connection}, "
              f"flwr stop <run-id> {cfg.connection} with FLWR_HOME={home}); its summary will be {summary_path}",
              file=sys.stderr, flush=True)
        return 130
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"fedpanfm federation run: {exc}", file=sys.stderr)
        print(f"  if the coordinator stopped: start it again, then {resume_command(run_folder, args.config)}",
              file=sys.stderr, flush=True)
        return 1
    if not follow_run:
        print(done["output"], end="")
        print(f"submitted; follow with: flwr log <run-id> {cfg.connection} --stream (FLWR_HOME={home}); "
              f"the summary will be {summary_path}")
        return 0
    fresh = summary_path.is_file() and summary_path.stat().st_mtime_ns != before
    if not fresh:
        print(f"fedpanfm federation run: the run ended without writing {summary_path}; see the ServerApp's "
              f"output in {done['log']} and {Path(cfg.state_dir) / 'superlink.log'}", file=sys.stderr, flush=True)
        return 1
    summary = {**json.loads(summary_path.read_text()), "resume_command": resume_command(run_folder, args.config)}
    print("\n" + summary_text(summary), flush=True)
    return 1 if summary.get("stopped") else 0

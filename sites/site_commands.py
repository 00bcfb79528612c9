"""``fedpanfm site check`` and ``fedpanfm site start``: what a hospital runs (a CLI plugin).

``check`` validates the site kit before joining: the data folder (every subject read and
preprocessed the way training will, then the cohort summary), the organs against the
config, the CA certificate and the auth key, and a TLS connection to the coordinator with the
CA (short timeout). ``start`` runs ``flower-supernode`` with TLS, the site's auth key and the
node config naming the site and its data, in the foreground, logging to ``log_dir``; beside it,
unless ``worker.enabled: false`` or ``--no-worker``, the site's trainer worker
(``sites/worker.py``), which keeps the DeepSpeed engine across rounds.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from fedpanfm.certs import CertError, check_tls, load_auth_private_key, load_certificate
from sites.site_config import SiteConfig, load_site_config


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``site`` subcommand (``check``, ``start``).

    Args:
        subparsers: the ``fedpanfm`` command's subparsers.
    """
    site = subparsers.add_parser("site", help="a hospital's side of a deployed federation")
    sub = site.add_subparsers(dest="site_command", metavar="ACTION", required=True)
    check = sub.add_parser("check", help="validate data, keys and the coordinator connection")
    check.add_argument("--config", required=True, type=Path, help="the site YAML (site.yaml)")
    check.add_argument("--timeout", type=float, default=5.0, help="TLS connection timeout in seconds")
    check.add_argument("--offline", action="store_true", help="skip the connection check")
    check.set_defaults(func=_run_check)
    start = sub.add_parser("start", help="join the federation (runs flower-supernode in the foreground)")
    start.add_argument("--config", required=True, type=Path, help="the site YAML (site.yaml)")
    start.add_argument("--insecure", action="store_true",
                       help="no TLS and no site authentication (testing only; the coordinator must be insecure too)")
    start.add_argument("--max-wait", type=float, default=None,
                       help="give up after this many seconds without a connection (default: keep retrying)")
    start.add_argument("--restarts", type=int, default=10,
                       help="restart a SuperNode that exits after running at least a minute (default 10 times)")
    start.add_argument("--no-worker", action="store_true",
                       help="no trainer worker: every ClientApp process builds its own DeepSpeed engine")
    start.set_defaults(func=_run_start)


# --------------------------------------------------------------------------- check


def check_data(site: SiteConfig) -> str:
    """Read every subject of the site as training will; the cohort summary table.

    Raises :class:`ValueError` naming the site and what is wrong (unreadable file, organs
    that differ from ``site.organs``).

    Args:
        site: the site config.
    """
    from fedpanfm.data.dataset import SiteDataset
    from fedpanfm.data.summary import format_summary, summarize_site

    data_dir = Path(site.data_dir)
    if not (data_dir / "manifest.csv").is_file():
        raise FileNotFoundError(f"site {site.site_name}: data_dir {data_dir} holds no manifest.csv")
    cfg = site.experiment_config()
    summary = summarize_site(data_dir, cfg)
    dataset = SiteDataset(data_dir, cfg)
    for i in range(len(dataset)):
        dataset[i]  # reads and preprocesses: a broken image fails here, not in round 1
    held = {o for i in range(len(dataset)) for o in dataset.organs_of(i)}
    if site.organs:
        declared = set(site.organs)
        unknown = declared - set(cfg.data.organ_set())
        if unknown:
            raise ValueError(f"{site.source}: organs: unknown organ(s) {sorted(unknown)}")
        if held != declared:
            raise ValueError(
                f"site {site.site_name}: organs in {data_dir} {sorted(held)} differ from organs in "
                f"{site.source} {sorted(declared)} (extra in data: {sorted(held - declared)}, "
                f"missing from data: {sorted(declared - held)})")
    return format_summary([summary])


def check_keys(site: SiteConfig) -> str:
    """Parse the CA certificate and the auth key; a one-line description."""
    ca = load_certificate(site.ca_cert)
    load_auth_private_key(site.auth_key)
    return f"CA {ca.subject.rfc4514_string()} ({site.ca_cert}), auth key {site.auth_key}"


def run_check(site: SiteConfig, timeout_s: float = 5.0, offline: bool = False) -> list[str]:
    """Run every check, printing each; returns the failures (empty: ready to join).

    Args:
        site: the site config.
        timeout_s: TLS connection timeout.
        offline: skip the connection check.
    """
    failures: list[str] = []

    def step(what: str, fn: Callable[[], str]) -> None:
        try:
            detail = fn()
            print(f"[ok]   {what}: {detail}" if "\n" not in detail else f"[ok]   {what}:\n{detail}")
        except (ValueError, OSError, CertError, ConnectionError) as exc:
            failures.append(f"{what}: {exc}")
            print(f"[FAIL] {what}: {exc}")

    step("data", lambda: check_data(site))
    step("keys", lambda: check_keys(site))
    if not offline:
        step("coordinator", lambda: f"{site.coordinator} presents a certificate for "
             f"{check_tls(site.coordinator, site.ca_cert, timeout_s)} trusted by the CA")
    return failures


def _run_check(args: argparse.Namespace) -> int:
    site = load_site_config(args.config)
    failures = run_check(site, args.timeout, args.offline)
    if failures:
        print(f"site {site.site_name}: {len(failures)} check(s) failed", file=sys.stderr)
        return 1
    print(f"site {site.site_name}: ready to join {site.coordinator}")
    return 0


# --------------------------------------------------------------------------- start


def supernode_command(site: SiteConfig, insecure: bool = False, max_wait_s: float | None = None,
                      worker: bool = False) -> list[str]:
    """The ``flower-supernode`` command line for this site.

    Runtime dependency installation stays off (Flower's SuperNode default; sites install the
    project themselves). Default (subprocess) isolation: the SuperNode starts each ClientApp.

    Args:
        site: the site config.
        insecure: no TLS, no authentication (testing only).
        max_wait_s: stop retrying a connection after this long (None: forever).
        worker: the node config names the site's trainer worker.
    """
    exe = shutil.which("flower-supernode")
    if exe is None:
        raise FileNotFoundError("flower-supernode not found on PATH: install the project (pip install -e .)")
    cmd = [exe, "--superlink", site.coordinator, "--node-config", site.node_config(worker),
           "--port", str(site.clientapp_port)]
    if insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", site.ca_cert, "--auth-supernode-private-key", site.auth_key]
    if max_wait_s is not None:
        cmd += ["--max-wait-time", str(max_wait_s)]
    return cmd


def supernode_env(site: SiteConfig) -> dict[str, str]:
    """The environment for the SuperNode (inherited by its ClientApp processes)."""
    env = dict(os.environ)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    if site.resources.cpus:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(site.resources.cpus)
    if site.resources.gpus == "none":
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif site.resources.gpus:
        env["CUDA_VISIBLE_DEVICES"] = site.resources.gpus
    return env


def _run_start(args: argparse.Namespace) -> int:
    site = load_site_config(args.config)
    # Data and keys are checked first: a broken kit should fail here, not at round 1.
    check_data(site)
    if not args.insecure:
        check_keys(site)
    else:
        print("WARNING: --insecure: no TLS, no site authentication; never use across institutions",
              file=sys.stderr)
    log_dir = Path(site.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "supernode.log"
    use_worker = site.worker.enabled and not args.no_worker
    cmd = supernode_command(site, args.insecure, args.max_wait, worker=use_worker)
    env = supernode_env(site)
    worker = None
    if use_worker:
        from sites.worker import WorkerProcess

        worker = WorkerProcess(site.worker.socket_path(), site.worker.key_path(), env,
                               log_dir / "trainer_worker.log", args.restarts)
        stats = worker.start()
        print(f"site {site.site_name}: trainer worker {stats['pid']} on {site.worker.socket_path()}; "
              f"log: {log_dir / 'trainer_worker.log'}", flush=True)
    try:
        print(f"site {site.site_name}: joining {site.coordinator}; SuperNode log: {log_path}", flush=True)
        return supervise(cmd, env, log_path, args.restarts)
    finally:
        if worker is not None:
            worker.stop()


#: A SuperNode that ran this long had joined; its exit is a fault worth a restart.
MIN_UPTIME_S = 60.0


def supervise(cmd: list[str], env: dict[str, str], log_path: Path, restarts: int) -> int:
    """Run the SuperNode in the foreground; restart it when it dies after having run a while.

    Why: Flower 1.41's SuperNode exits on one HTTP 500 from the SuperLink (seen here as
    "database is locked" in the SuperLink's SQLite state under heavy load), which would drop
    the site from the rest of the run. A SuperNode that fails within ``MIN_UPTIME_S`` (key
    refused, CA wrong, coordinator unreachable) is not restarted: that needs a person. A
    restarted node loses what the site kept in ``context.state`` (its running organ saliency
    and schedule position); it continues from the federation's schedule position.

    Args:
        cmd: the ``flower-supernode`` command.
        env: its environment.
        log_path: the log file (appended).
        restarts: how many restarts at most.
    """
    stopping = False
    proc: subprocess.Popen[bytes] | None = None

    def on_term(*_: object) -> None:
        nonlocal stopping
        stopping = True
        if proc is not None and proc.poll() is None:
            proc.terminate()  # only signal: waiting here would re-enter the main wait()

    signal.signal(signal.SIGTERM, on_term)
    for attempt in range(restarts + 1):
        t0 = time.monotonic()
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                code = proc.wait()
            except KeyboardInterrupt:
                stopping = True
                proc.terminate()
                code = proc.wait(timeout=30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=30)
        uptime = time.monotonic() - t0
        if stopping or uptime < MIN_UPTIME_S or attempt == restarts:
            return code
        print(f"SuperNode exited ({code}) after {uptime:.0f} s; restarting ({attempt + 1}/{restarts}), "
              f"see {log_path}", file=sys.stderr, flush=True)
        time.sleep(5.0)
    return 1

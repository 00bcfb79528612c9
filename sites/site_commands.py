"""``fedpanfm site check`` and ``fedpanfm site start``: what a hospital runs (a CLI plugin).

``check`` validates the site kit before joining: the data folder (every subject read and
preprocessed the way training will, then the cohort summary under the site's name), the organs
against the config, the CA certificate and the auth key, a TLS connection to the coordinator with
the CA (short timeout), and that the coordinator registered the site's key (a signed request,
sites/registration.py). ``start`` runs ``flower-supernode`` with TLS, the site's auth key and the
node config naming the site and its data, in the foreground, logging to ``log_dir``; beside it,
unless ``worker.enabled: false`` or ``--no-worker``, the site's trainer worker
(``sites/worker/``), which keeps the DeepSpeed engine across rounds. ``start`` is the child
subreaper of everything below it: the ClientApp processes the SuperNode starts end with it
(fedpanfm/supervision.py), and when it stops it says why on the console.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from fedpanfm.certs import CertError, check_tls, load_auth_private_key, load_certificate
from fedpanfm.cli import add_file_option
from fedpanfm.supervision import end_descendants, set_child_subreaper
from sites.approved_app import (
    APPROVED_ENV,
    app_hash,
    approve_in_site_yaml,
    check_app_hash,
    project_root,
    write_clientapp_shim,
)
from sites.registration import probe_registration
from sites.site_config import SiteConfig, load_site_config


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``site`` subcommand (``check``, ``start``).

    Args:
        subparsers: the ``fedpanfm`` command's subparsers.
    """
    site = subparsers.add_parser("site", help="a hospital's side of a deployed federation")
    sub = site.add_subparsers(dest="site_command", metavar="ACTION", required=True)
    check = sub.add_parser("check", help="validate data, keys and the coordinator connection")
    add_file_option(check, "--site-config", "the site YAML (site.yaml)")
    check.add_argument("--timeout", type=float, default=5.0, help="TLS connection timeout in seconds")
    check.add_argument("--offline", action="store_true", help="skip the connection and registration checks")
    check.set_defaults(func=_run_check)
    start = sub.add_parser("start", help="join the federation (runs flower-supernode in the foreground)")
    add_file_option(start, "--site-config", "the site YAML (site.yaml)")
    start.add_argument("--insecure", action="store_true",
                       help="no TLS and no site authentication (testing only; the coordinator must be insecure too)")
    start.add_argument("--max-wait", type=float, default=None,
                       help="give up after this many seconds without a connection (default: keep retrying)")
    start.add_argument("--restarts", type=int, default=10,
                       help="restart a SuperNode that exits after running at least a minute (default 10 times)")
    start.add_argument("--no-worker", action="store_true",
                       help="no trainer worker: every ClientApp process builds its own DeepSpeed engine")
    start.set_defaults(func=_run_start)
    approve = sub.add_parser("approve-app", help="pin the app bundle (FAB) this site runs: the hash of a reviewed checkout")
    add_file_option(approve, "--site-config", "the site YAML (site.yaml)")
    approve.add_argument("--app-dir", type=Path, default=None,
                         help="the reviewed project checkout (default: the installed project)")
    approve.add_argument("--hash", default=None, help="approve this FAB SHA-256 instead of computing one")
    approve.add_argument("--write", action="store_true", help="add it to approved_apps in the site YAML")
    approve.set_defaults(func=_run_approve)


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
    # Named as the coordinator knows the site, not by its data folder.
    summary = dataclasses.replace(summarize_site(data_dir, cfg), site=site.site_name)
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
    if site.allow_any_app:
        print(f"[warn] app approval: {site.app_approval()}")
    else:
        step("app approval", site.app_approval)
    if not offline:
        step("coordinator", lambda: f"{site.coordinator} presents a certificate for "
             f"{check_tls(site.coordinator, site.ca_cert, timeout_s)} trusted by the CA")
        if not any(f.startswith(("keys:", "coordinator:")) for f in failures):
            step("registration", lambda: f"the coordinator accepted site {site.site_name}'s signed request: its key "
                 f"is registered (node {probe_registration(site.coordinator, site.ca_cert, site.auth_key, timeout_s)})")
    return failures


def _run_check(args: argparse.Namespace) -> int:
    site = load_site_config(args.config)
    failures = run_check(site, args.timeout, args.offline)
    if failures:
        print(f"site {site.site_name}: {len(failures)} check(s) failed", file=sys.stderr)
        return 1
    print(f"site {site.site_name}: ready to join {site.coordinator}")
    return 0


def _run_approve(args: argparse.Namespace) -> int:
    site = load_site_config(args.config)
    app_dir = args.app_dir or project_root()
    digest = check_app_hash(args.hash, "--hash") if args.hash else app_hash(app_dir)
    print(f"app bundle sha256 {digest}" + ("" if args.hash else f" (built from {app_dir})"))
    if args.write:
        approved = approve_in_site_yaml(args.config, digest, site.approved_apps)
        load_site_config(args.config)  # still a valid site config
        print(f"site {site.site_name}: {args.config} approves {len(approved)} app bundle(s)")
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
    """The environment for the SuperNode (inherited by its ClientApp processes).

    Unless ``allow_any_app``, our ``flwr-clientapp`` (sites/approved_app.py) comes first on ``PATH``
    and the approved hashes are in its environment: every ClientApp checks its FAB first (with
    none approved it refuses every FAB: fail closed).
    """
    env = dict(os.environ)
    if not site.allow_any_app:
        shim = write_clientapp_shim(Path(site.worker.state_dir) / "bin")
        env["PATH"] = os.pathsep.join([str(shim.parent), env.get("PATH", "")])
        env[APPROVED_ENV] = ",".join(site.approved_apps)
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
    approval = site.app_approval()  # deny by default: a site that approved no app does not start
    # Data and keys are checked first: a broken kit should fail here, not at round 1.
    check_data(site)
    if not args.insecure:
        check_keys(site)
    else:
        print("WARNING: --insecure: no TLS, no site authentication; never use across institutions",
              file=sys.stderr)
    if site.allow_any_app:
        print(f"WARNING: {site.source}: {approval}", file=sys.stderr)
    else:
        print(f"site {site.site_name}: {approval}", flush=True)
    # ClientApp processes whose SuperNode died are re-parented here, so they are ended below.
    set_child_subreaper()
    log_dir = Path(site.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "supernode.log"
    use_worker = site.worker.enabled and not args.no_worker
    cmd = supernode_command(site, args.insecure, args.max_wait, worker=use_worker)
    env = supernode_env(site)
    worker = None
    if use_worker:
        from sites.worker.supervisor import WorkerProcess

        worker = WorkerProcess(site.worker.socket_path(), site.worker.key_path(), env,
                               log_dir / "trainer_worker.log", args.restarts)
        stats = worker.start()
        print(f"site {site.site_name}: trainer worker {stats['pid']} on {site.worker.socket_path()}; "
              f"log: {log_dir / 'trainer_worker.log'}", flush=True)

    def worker_pids() -> set[int]:
        return {worker.proc.pid} if worker is not None and worker.proc is not None else set()

    outcome = Outcome()
    try:
        print(f"site {site.site_name}: joining {site.coordinator}; SuperNode log: {log_path}", flush=True)
        outcome = supervise(cmd, env, log_path, args.restarts, keep=worker_pids)
    finally:
        if worker is not None:
            worker.stop()
        left = end_descendants()
        if left:
            print(f"site {site.site_name}: ended {len(left)} process(es) the SuperNode left (pids "
                  f"{', '.join(map(str, left))})", file=sys.stderr, flush=True)
    if outcome.stopped:
        print(f"site {site.site_name}: stopped ({outcome.stopped})", flush=True)
        return 0
    reason = stop_reason(log_path.read_text(errors="replace") if log_path.is_file() else "", site)
    print(f"site {site.site_name}: the SuperNode stopped (exit {outcome.code}): {reason}; log: {log_path}",
          file=sys.stderr, flush=True)
    return outcome.code or 1


#: A SuperNode that ran this long had joined; its exit is a fault worth a restart.
MIN_UPTIME_S = 60.0

_ANSI = re.compile(r"\x1b\[[0-9;]*m")

#: What the SuperNode's log says when it gives up, and what it means for the site's operator
#: (Flower 1.41's messages, as seen in tests/orchestration/test_deployment.py).
STOP_REASONS: tuple[tuple[str, str], ...] = (
    ("Failed to activate SuperNode", "the coordinator refused this site's key {auth_key}: it is not registered "
     "there (the coordinator adds the site to `sites` and runs `fedpanfm server register`), it was unregistered, "
     "or a SuperNode with this key is already online"),
    ("CERTIFICATE_VERIFY_FAILED", "TLS: the coordinator {coordinator} presents a certificate the CA {ca_cert} does "
     "not trust (a wrong ca.crt, or the coordinator's certificates were replaced)"),
    ("Hostname mismatch", "TLS: the coordinator's certificate is not for the name in `coordinator` ({coordinator})"),
    ("Invalid SuperNode authentication", "the coordinator rejected the site's signature (clock off by more than "
     "a minute, or a damaged key file {auth_key})"),
    ("Heartbeat failed unexpectedly", "the coordinator no longer knows this SuperNode (it was unregistered, or "
     "the coordinator lost its state database)"),
    ("Connection refused", "the coordinator {coordinator} does not answer (not running, or a firewall)"),
    ("All connection attempts failed", "the coordinator {coordinator} does not answer (not running, or a firewall)"),
    ("Name or service not known", "the coordinator's host name in `coordinator` ({coordinator}) does not resolve"),
)


def stop_reason(log_text: str, site: SiteConfig) -> str:
    """Why the SuperNode stopped, in the site operator's words, from the end of its log.

    Args:
        log_text: the SuperNode log (only what its last start wrote is read).
        site: the site config (named in the reason).
    """
    text = _ANSI.sub("", log_text)
    start = text.rfind("Starting Flower SuperNode")
    tail = text[start:] if start >= 0 else text[-20000:]
    for needle, reason in STOP_REASONS:
        if needle in tail:
            return reason.format(auth_key=site.auth_key, coordinator=site.coordinator, ca_cert=site.ca_cert)
    errors = [ln.split(":", 1)[-1].strip() for ln in tail.splitlines() if ln.lstrip().startswith(("ERROR", "CRITICAL"))]
    errors = [e for e in errors if e and not e.startswith("Exit Code")]
    return errors[-1] if errors else "no reason in its log"


@dataclasses.dataclass
class Outcome:
    """How :func:`supervise` ended: the SuperNode's last exit code, and the signal that stopped
    it from outside ("" when it stopped by itself)."""

    code: int = 1
    stopped: str = ""


def supervise(cmd: list[str], env: dict[str, str], log_path: Path, restarts: int,
              keep: Callable[[], Iterable[int]] = set) -> Outcome:
    """Run the SuperNode in the foreground; restart it when it dies after having run a while.

    Why: Flower 1.41's SuperNode exits on one HTTP 500 from the SuperLink (seen here as
    "database is locked" in the SuperLink's SQLite state under heavy load), which would drop
    the site from the rest of the run; after a coordinator restart it may exit as well (its node
    was marked offline). A SuperNode that fails within ``MIN_UPTIME_S`` (key refused, CA wrong,
    coordinator unreachable) is not restarted: that needs a person. A restarted node loses what
    the site kept in ``context.state`` unless the trainer worker holds it (sites/worker/).
    After each exit the ClientApp processes it left are ended (this process is their subreaper).

    Args:
        cmd: the ``flower-supernode`` command.
        env: its environment.
        log_path: the log file (appended).
        restarts: how many restarts at most.
        keep: PIDs of processes below this one that must survive a SuperNode exit (the worker).
    """
    stopping = ""
    proc: subprocess.Popen[bytes] | None = None

    def on_term(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = signal.Signals(signum).name
        if proc is not None and proc.poll() is None:
            proc.terminate()  # only signal: waiting here would re-enter the main wait()

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_term)
    code = 1
    for attempt in range(restarts + 1):
        t0 = time.monotonic()
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                code = proc.wait()
            except KeyboardInterrupt:
                stopping = "Ctrl-C"
                proc.terminate()
                code = proc.wait(timeout=30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=30)
        end_descendants(keep=keep())
        uptime = time.monotonic() - t0
        if stopping or uptime < MIN_UPTIME_S or attempt == restarts:
            return Outcome(code, stopping)
        print(f"SuperNode exited ({code}) after {uptime:.0f} s; restarting ({attempt + 1}/{restarts}), "
              f"see {log_path}", file=sys.stderr, flush=True)
        time.sleep(5.0)
    return Outcome(code, stopping)

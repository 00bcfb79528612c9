"""A deployed federation on loopback, following docs/deployment.md's commands: certificates, a
coordinator with TLS and site authentication, two sites as separate processes with their own
data, each running only the app it approved (`site approve-app`: the FAB hash of the release
checkout); a site with an unregistered key and one without the CA are refused (and `site check`
says so). A third registered site that approved another release refuses the app in every round
(the run goes on with the two others; nothing of it trains there).
An uninterrupted run, then the same run with the coordinator's supervisor SIGKILLed after
its first checkpoint: nothing of the coordinator survives, a restart works at once with the
registrations kept, the sites reconnect by themselves, ``federation run --resume`` finishes
the run and its final checkpoint equals the uninterrupted one within docs/reliability.md's
tolerance; stopping the sites leaves no process of theirs (no ClientApp) behind.

Every process is started in its own session and stopped by its PID (its whole process tree) in
the fixture's teardown, also when the test fails.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import TINY

from fedpanfm.certs import init_certs
from fedpanfm.checkpoint import load_checkpoint
from fedpanfm.config import config_from_dict
from fedpanfm.data.synthetic import generate_cohort
from fedpanfm.supervision import ProcessRecord
from orchestration.resume import find_resume_point

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Processes:
    """Processes a test starts; ``stop_all`` ends each one's tree by PID."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, cmd: list[str], log: Path, **kw: object) -> subprocess.Popen[bytes]:
        env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
        with open(log, "wb") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True, cwd=ROOT, **kw)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        tree: list[psutil.Process] = []
        for proc in self.procs:
            try:
                parent = psutil.Process(proc.pid)
                tree += [*parent.children(recursive=True), parent]
            except psutil.NoSuchProcess:
                pass
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        _, alive = psutil.wait_procs(tree, timeout=20)
        for p in alive:  # Flower's executors detach into their own sessions: end them by PID
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture
def processes():
    procs = Processes()
    try:
        yield procs
    finally:
        procs.stop_all()


def wait_for_text(path: Path, text: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not in {path} after {timeout_s} s (exit {proc.poll()}):\n"
                         f"{path.read_text(errors='replace')[-3000:] if path.is_file() else ''}")


def finish(proc: subprocess.Popen[bytes], timeout_s: float) -> int:
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{proc.args} still running after {timeout_s} s") from None


def site_yaml(folder: Path, name: str, data_dir: Path, key_dir: Path, port: int, experiment: Path,
              approved: list[str]) -> Path:
    """A site kit's site.yaml; ``approved``: its approved_apps ([]: `site approve-app --write` adds one)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump({
        "site_name": name, "data_dir": str(data_dir), "experiment": str(experiment),
        "coordinator": f"127.0.0.1:{port}", "ca_cert": str(key_dir / "ca.crt"),
        "auth_key": str(key_dir / "auth.key"), "clientapp_port": free_port(), "resources": {"cpus": 1},
        "approved_apps": approved,
    }))
    return path


def approve_app(site_config: Path, *args: str) -> str:
    """``fedpanfm site approve-app --site-config S ARGS --write``, as a site's operator runs it; the hash."""
    res = subprocess.run([str(BIN / "fedpanfm"), "site", "approve-app", "--site-config", str(site_config), *args,
                          "--write"], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    found = re.search(r"app bundle sha256 ([0-9a-f]{64})", res.stdout)
    assert found and "approves 1 app bundle(s)" in res.stdout, res.stdout
    return found.group(1)


def release_checkout(dest: Path) -> Path:
    """The project's files as `flwr run` ships them (its FAB's content), frozen in ``dest``: the
    release both the coordinator submits and the sites review. A copy, so that edits to the
    working tree while the test runs do not change the app under the sites' approval."""
    from flwr.cli.build import build_fab_from_disk

    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT))) as fab:
        for name in fab.namelist():
            if not name.startswith(".info/"):
                fab.extract(name, dest)
    return dest


def online_sites(flwr_home: Path) -> int:
    ls = subprocess.run([str(BIN / "flwr"), "supernode", "ls", "fedpanfm", "--format", "json"], capture_output=True,
                        text=True, timeout=60, env={**os.environ, "FLWR_HOME": str(flwr_home)})
    nodes = json.loads(ls.stdout[ls.stdout.find("{"):]).get("nodes", []) if "{" in ls.stdout else []
    return sum(n.get("status") == "online" for n in nodes)


def wait_online(flwr_home: Path, n: int, timeout_s: float) -> None:
    deadline, online = time.monotonic() + timeout_s, 0
    while time.monotonic() < deadline:
        online = online_sites(flwr_home)
        if online >= n:
            return
        time.sleep(2)
    raise AssertionError(f"{online} of {n} sites online after {timeout_s:.0f} s")


def tree(proc: subprocess.Popen[bytes]) -> list[ProcessRecord]:
    """The processes below ``proc`` now, each with its start time (so a reused PID is not ours)."""
    out = []
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            out.append(ProcessRecord.of(p))
        except psutil.NoSuchProcess:
            pass
    return out


def wait_gone(records: list[ProcessRecord], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while any(r.process() for r in records) and time.monotonic() < deadline:
        time.sleep(0.5)
    alive = [r for r in records if r.process()]
    assert not alive, f"still running {timeout_s:.0f} s later: {alive}"


def federation_run(args: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "fedpanfm"), "federation", "run", *args], capture_output=True, text=True,
                          timeout=timeout_s, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_deployed_federation(tmp_path: Path, processes: Processes) -> None:
    fedpanfm = str(BIN / "fedpanfm")
    raw = {**TINY, "name": "deploytest", "device": "cpu", "synth": {"sites": 2, "subjects": 6},
           "federation": {"rounds": 3, "min_sites": 2, "round_timeout_s": 600}}
    # No held-out subjects: no evaluate messages, so half the ClientApp launches per round (each
    # message starts a fresh ClientApp process under Flower 1.41; see docs/deployment.md).
    raw["data"] = {**TINY["data"], "val_fraction": 0.0}
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(yaml.safe_dump(raw))
    # A synthetic cohort's site folders serve as the sites' data folders (docs/deployment.md §3).
    sites = generate_cohort(tmp_path / "cohort", config_from_dict(raw))
    names = [s.name for s in sites]
    # Registered like the others, but its site.yaml approves another release than the one submitted.
    unapproved = "site_unapproved"
    certs = init_certs(tmp_path / "certs", "127.0.0.1", [*names, unapproved, "rogue"])
    port = free_port()
    release = release_checkout(tmp_path / "release")
    deployment = tmp_path / "deployment.yaml"
    deployment.write_text(yaml.safe_dump({
        "server_host": "127.0.0.1", "bind_host": "127.0.0.1", "port": port, "certs_dir": str(certs.out),
        "sites": {n: "" for n in [*names, unapproved]}, "state_dir": str(tmp_path / "deploy"),
        "experiment": str(experiment), "run_dir": str(tmp_path / "runs"), "app_dir": str(release),
    }))
    # Each site pins the app it reviewed: the first computes the hash from the release checkout, the
    # second approves the hash the consortium published (`--hash`).
    t0 = time.monotonic()
    kits = [site_yaml(tmp_path / f"kit_{n}", n, s, certs.site_dir(n), port, experiment, [])
            for n, s in zip(names, sites)]
    digest = approve_app(kits[0], "--app-dir", str(release))
    assert approve_app(kits[1], "--hash", digest) == digest
    print(f"approving the release at both sites: {time.monotonic() - t0:.1f} s")
    coordinator_home = tmp_path / "deploy" / "flwr_home"
    flwr_home = ["--flwr-home", str(tmp_path / "flwr_home")]

    server = processes.start([fedpanfm, "server", "start", "--coordinator-config", str(deployment)],
                             tmp_path / "server.out")
    wait_for_text(tmp_path / "server.out", "SuperLink serving", server, 120)
    for n in [*names, unapproved]:
        assert f"site {n}: registered" in (tmp_path / "server.out").read_text()

    # A site whose key was never registered: `site check` says so, `site start` is refused and says why.
    rogue = site_yaml(tmp_path / "kit_rogue", "rogue", sites[0], certs.site_dir("rogue"), port, experiment, [digest])
    check = subprocess.run([fedpanfm, "site", "check", "--site-config", str(rogue)], capture_output=True, text=True,
                           timeout=120, cwd=ROOT)
    assert check.returncode == 1 and "[FAIL] registration" in check.stdout, check.stdout + check.stderr
    assert "[ok]   coordinator" in check.stdout and "it is not registered there" in check.stdout
    p = processes.start([fedpanfm, "site", "start", "--site-config", str(rogue), "--max-wait", "20"],
                        tmp_path / "rogue.out")
    assert finish(p, 90) != 0
    assert "Failed to activate SuperNode" in (tmp_path / "kit_rogue" / "logs" / "supernode.log").read_text()
    assert "site rogue: the SuperNode stopped (exit 1): the coordinator refused this site's key" in \
        (tmp_path / "rogue.out").read_text()
    # A SuperNode without the federation's CA cannot connect (system CAs do not trust the server).
    p = processes.start([str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}",
                         "--auth-supernode-private-key", str(certs.site_private_key(names[0])),
                         "--port", str(free_port()), "--max-wait-time", "10"], tmp_path / "noca.out")
    assert finish(p, 90) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in (tmp_path / "noca.out").read_text()

    check = subprocess.run([fedpanfm, "site", "check", "--site-config", str(kits[0])], capture_output=True, text=True,
                           timeout=120, cwd=ROOT)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "ready to join" in check.stdout and "[ok]   coordinator" in check.stdout
    assert f"[ok]   app approval: only app bundles with SHA-256 {digest[:12]}... run here" in check.stdout
    assert f"[ok]   registration: the coordinator accepted site {names[0]}'s signed request" in check.stdout
    site_procs = [processes.start([fedpanfm, "site", "start", "--site-config", str(kit)], tmp_path / f"site_{n}.out")
                  for n, kit in zip(names, kits)]
    # The unapproved site: its own copy of a data folder, no trainer worker (it never trains).
    other_release = "0" * 64
    kit_unapproved = site_yaml(tmp_path / f"kit_{unapproved}", unapproved, Path(shutil.copytree(sites[0], tmp_path / "data_u")),
                               certs.site_dir(unapproved), port, experiment, [other_release])
    site_procs.append(processes.start([fedpanfm, "site", "start", "--site-config", str(kit_unapproved), "--no-worker"],
                                      tmp_path / f"site_{unapproved}.out"))
    everyone = [*names, unapproved]
    # Submit once all are online, so the first round samples every site.
    wait_online(coordinator_home, len(everyone), 120)

    # 1. The uninterrupted run: the run folder at once, the summary at the end.
    ref = tmp_path / "runs" / "reference"
    done = federation_run(["--coordinator-config", str(deployment), *flwr_home, "--run-folder", str(ref)], 900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert done.stdout.startswith(f"run folder on the coordinator: {ref}"), done.stdout[:500]
    assert f"fedpanfm: 3 rounds over sites {', '.join(sorted(names))}" in done.stdout, done.stdout[-4000:]
    # The same per-round lines as simulate and one summary; Flower's per-round dumps only in the log.
    assert "round 3/3  train" in done.stdout and "Aggregated MetricRecord" not in done.stdout, done.stdout[-4000:]
    assert done.stdout.count("fedpanfm: 3 rounds over sites") == 1, done.stdout[-4000:]
    # The run folder explains itself as a simulation's does (orchestration/deployed_run.py).
    assert "fedpanfm federation run --coordinator-config" in (ref / "command.txt").read_text()
    assert "round 3/3  train" in (ref / "run.log").read_text()
    assert len(json.loads((ref / "environment.json").read_text())["sessions"]) == 2
    assert (tmp_path / "flwr_home" / "config.toml").is_file() and (ref / "federation_run.log").is_file()
    summary = json.loads((ref / "summary.json").read_text())
    assert summary["rounds"] == 3 and sorted(summary["sites"]) == sorted(names), summary
    # The unapproved site refused the app every time it was sent (the round went on with the
    # two others): the coordinator was told why, the site's log names the FAB hash, and nothing
    # of the run trained there.
    refusal = f"app bundle sha256 {digest} is not approved by this site"
    assert refusal in (ref / "federation_run.log").read_text(), done.stdout[-4000:]
    site_log = (tmp_path / f"kit_{unapproved}" / "logs" / "supernode.log").read_text()
    assert f"refused the app the coordinator sent: {refusal}" in site_log, site_log[-3000:]
    assert unapproved not in summary["site_steps"] and set(summary["site_steps"]) == set(names), summary
    assert f"site {unapproved}: only app bundles with SHA-256 {other_release[:12]}... run here" in \
        (tmp_path / f"site_{unapproved}.out").read_text()
    tb = ref / "tensorboard"
    assert list((tb / "server").glob("events.out.tfevents.*")), f"no server TensorBoard events in {tb}"
    for n in names:  # one sub-run per site (RunLogger names it after the site)
        runs = [d for d in tb.iterdir() if d.name.endswith(n.removeprefix("site_")) and d.name != "server"]
        assert len(runs) == 1 and list(runs[0].glob("events.out.tfevents.*")), f"no TensorBoard events for {n} in {tb}"
    assert not [d for d in tb.iterdir() if d.name.endswith("unapproved")], sorted(tb.iterdir())

    # 2. The same run, its coordinator's supervisor SIGKILLed after the first checkpoint.
    crashed = tmp_path / "runs" / "crashed"
    sub = federation_run(["--coordinator-config", str(deployment), *flwr_home, "--run-folder", str(crashed),
                          "--detach"], 180)
    assert sub.returncode == 0 and sub.stdout.startswith(f"run folder on the coordinator: {crashed}"), \
        sub.stdout + sub.stderr
    deadline = time.monotonic() + 600
    while not (crashed / "checkpoints" / "round_1" / "SHA256SUMS").is_file():
        assert time.monotonic() < deadline and server.poll() is None, "no round-1 checkpoint within 600 s"
        time.sleep(0.5)
    coordinator = tree(server)
    assert any("superlink" in r.name for r in coordinator) and len(coordinator) >= 4, coordinator
    os.kill(server.pid, signal.SIGKILL)
    server.wait(timeout=10)
    wait_gone(coordinator, 60)  # SuperLink, SuperExec, ServerApp, Ray: by the PIDs it had started
    assert not (tmp_path / "deploy" / "coordinator.pid").exists()
    killed_at = find_resume_point(crashed).round
    assert killed_at < 3, "the run finished before the kill: nothing was interrupted"

    # Restart at once: the port is free, the registrations are kept, the sites come back by themselves.
    server = processes.start([fedpanfm, "server", "start", "--coordinator-config", str(deployment)],
                             tmp_path / "server2.out")
    wait_for_text(tmp_path / "server2.out", "SuperLink serving", server, 120)
    for n in everyone:
        assert f"site {n}: already registered" in (tmp_path / "server2.out").read_text()
    wait_online(coordinator_home, len(everyone), 420)  # a SuperNode's heartbeat retries back off
    resumed = federation_run(["--coordinator-config", str(deployment), *flwr_home, "--resume", str(crashed)], 900)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    assert f"resuming {crashed} after round" in resumed.stdout and "fedpanfm: 3 rounds" in resumed.stdout
    summary = json.loads((crashed / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["stopped"] is None and summary["resumed_from_round"] == killed_at
    for n in names:  # each site continued from the state it kept after the resume point (sites/worker/)
        worker_log = (tmp_path / f"kit_{n}" / "logs" / "trainer_worker.log").read_text()
        assert f"round {killed_at + 1}: continuing from the site state kept after round {killed_at}" in worker_log

    # The resumed run's final weights equal the uninterrupted run's (docs/reliability.md: tolerance).
    a, _, meta_a = load_checkpoint(ref / "checkpoints" / "latest")
    b, _, meta_b = load_checkpoint(crashed / "checkpoints" / "latest")
    assert meta_a["round"] == meta_b["round"] == 3 and set(a) == set(b)
    diffs = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point() and a[k].numel()}
    worst = max(diffs, key=diffs.get)
    scale = max(float(a[k].double().abs().max()) for k in diffs)
    print(f"resumed vs uninterrupted: max |diff| {diffs[worst]:.3g} at {worst}; max |weight| {scale:.3g}")
    assert diffs[worst] <= RESUME_ATOL + RESUME_RTOL * scale, (worst, diffs[worst])

    # Stopping the sites leaves nothing of theirs running: SuperNode, SuperExec, worker, ClientApps.
    below = [r for proc in site_procs for r in tree(proc)]
    assert any("flower-supernode" in r.name or "supernode" in r.name for r in below), below
    for proc in site_procs:
        proc.terminate()
    for proc, n in zip(site_procs, everyone):
        assert finish(proc, 60) == 0
        assert f"site {n}: stopped (SIGTERM)" in (tmp_path / f"site_{n}.out").read_text()
    wait_gone(below, 30)


#: docs/reliability.md, "Resuming a deployment": the final weights of a resumed deployment and
#: of the uninterrupted run agree to max |diff| <= ATOL + RTOL * max |weight|.
RESUME_ATOL, RESUME_RTOL = 1e-6, 1e-5

"""A deployed federation on loopback: certificates, a SuperLink with TLS and site authentication,
three SuperNodes as separate processes with their own data, two rounds submitted with
``fedpanfm federation run``; a site with an unregistered key and one without the CA are refused.

Every process is started in its own session and stopped by its PID (its whole process tree) in
the fixture's teardown, also when the test fails.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import TINY

from fedpanfm.certs import init_certs
from fedpanfm.config import config_from_dict
from fedpanfm.data.synthetic import generate_cohort

ROOT = Path(__file__).resolve().parents[1]
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


def site_yaml(folder: Path, name: str, data_dir: Path, key_dir: Path, port: int, experiment: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump({
        "site_name": name, "data_dir": str(data_dir), "experiment": str(experiment),
        "coordinator": f"127.0.0.1:{port}", "ca_cert": str(key_dir / "ca.crt"),
        "auth_key": str(key_dir / "auth.key"), "clientapp_port": free_port(), "resources": {"cpus": 1},
    }))
    return path


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_deployed_federation(tmp_path: Path, processes: Processes) -> None:
    fedpanfm = str(BIN / "fedpanfm")
    raw = {**TINY, "name": "deploytest", "device": "cpu", "synth": {"sites": 3, "subjects": 6},
           "federation": {"rounds": 2, "min_sites": 3, "round_timeout_s": 600}}
    # No held-out subjects: no evaluate messages, so half the ClientApp launches per round (each
    # message starts a fresh ClientApp process under Flower 1.41; see docs/deployment.md).
    raw["data"] = {**TINY["data"], "val_fraction": 0.0}
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(yaml.safe_dump(raw))
    sites = generate_cohort(tmp_path / "cohort", config_from_dict(raw))
    names = [s.name for s in sites]
    certs = init_certs(tmp_path / "certs", "127.0.0.1", [*names, "rogue"])
    port = free_port()
    deployment = tmp_path / "deployment.yaml"
    deployment.write_text(yaml.safe_dump({
        "server_host": "127.0.0.1", "bind_host": "127.0.0.1", "port": port, "certs_dir": str(certs.out),
        "sites": {n: "" for n in names}, "state_dir": str(tmp_path / "deploy"), "experiment": str(experiment),
        "run_dir": str(tmp_path / "runs"), "app_dir": str(ROOT),
    }))

    server = processes.start([fedpanfm, "server", "start", "--config", str(deployment)], tmp_path / "server.out")
    wait_for_text(tmp_path / "server.out", "SuperLink serving", server, 120)
    for n in names:
        assert f"site {n}: registered" in (tmp_path / "server.out").read_text()

    # A site whose key was never registered is refused.
    rogue = site_yaml(tmp_path / "kit_rogue", "rogue", sites[0], certs.site_dir("rogue"), port, experiment)
    p = processes.start([fedpanfm, "site", "start", "--config", str(rogue), "--max-wait", "20"], tmp_path / "rogue.out")
    assert finish(p, 90) != 0
    assert "Failed to activate SuperNode" in (tmp_path / "kit_rogue" / "logs" / "supernode.log").read_text()
    # A SuperNode without the federation's CA cannot connect (system CAs do not trust the server).
    p = processes.start([str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}",
                         "--auth-supernode-private-key", str(certs.site_private_key(names[0])),
                         "--port", str(free_port()), "--max-wait-time", "10"], tmp_path / "noca.out")
    assert finish(p, 90) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in (tmp_path / "noca.out").read_text()

    kits = [site_yaml(tmp_path / f"kit_{n}", n, s, certs.site_dir(n), port, experiment) for n, s in zip(names, sites)]
    check = subprocess.run([fedpanfm, "site", "check", "--config", str(kits[0])], capture_output=True, text=True,
                           timeout=120, cwd=ROOT)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "ready to join" in check.stdout and "[ok]   coordinator" in check.stdout
    for n, kit in zip(names, kits):
        processes.start([fedpanfm, "site", "start", "--config", str(kit)], tmp_path / f"site_{n}.out")

    # Submit once all three are online, so the first round samples every site.
    deadline, online = time.monotonic() + 120, 0
    while online < 3 and time.monotonic() < deadline:
        ls = subprocess.run([str(BIN / "flwr"), "supernode", "ls", "fedpanfm", "--format", "json"], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "FLWR_HOME": str(tmp_path / "deploy" / "flwr_home")})
        nodes = json.loads(ls.stdout[ls.stdout.find("{"):]).get("nodes", []) if "{" in ls.stdout else []
        online = sum(n.get("status") == "online" for n in nodes)
        time.sleep(1)
    assert online == 3, f"{online} of 3 sites online after 120 s"

    run_folder = tmp_path / "runs" / "deploytest"
    submit = subprocess.run([fedpanfm, "federation", "run", "--config", str(deployment), "--flwr-home",
                             str(tmp_path / "flwr_home"), "--run-folder", str(run_folder)],
                            capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    assert (tmp_path / "flwr_home" / "config.toml").is_file()

    summary_path = run_folder / "summary.json"
    deadline = time.monotonic() + 600
    while not summary_path.is_file() and time.monotonic() < deadline:
        assert server.poll() is None, (tmp_path / "server.out").read_text()
        time.sleep(2)
    log = (tmp_path / "deploy" / "superlink.log").read_text(errors="replace")
    assert summary_path.is_file(), f"no summary after 600 s; SuperLink log tail:\n{log[-4000:]}"
    summary = json.loads(summary_path.read_text())
    if summary["rounds"] != 2:
        run_id = re.search(r"run (\d+)", submit.stdout)
        shown = subprocess.run([str(BIN / "flwr"), "log", run_id.group(1) if run_id else "0", "fedpanfm", "--show"],
                               capture_output=True, text=True, timeout=60,
                               env={**os.environ, "FLWR_HOME": str(tmp_path / "flwr_home")})
        raise AssertionError(f"{summary}\nsubmit: {submit.stdout}\nServerApp log:\n{shown.stdout[-6000:]}")
    assert sorted(summary["sites"]) == sorted(names), summary  # every site contributed
    assert (run_folder / "checkpoints" / "latest").exists()
    tb = run_folder / "tensorboard"
    assert list((tb / "server").glob("events.out.tfevents.*")), f"no server TensorBoard events in {tb}"
    for n in names:  # one sub-run per site (RunLogger names it after the site)
        runs = [d for d in tb.iterdir() if d.name.endswith(n.removeprefix("site_")) and d.name != "server"]
        assert len(runs) == 1 and list(runs[0].glob("events.out.tfevents.*")), f"no TensorBoard events for {n} in {tb}"

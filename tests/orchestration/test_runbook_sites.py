"""docs/deployment.md section 7 run as written: add a site, remove a site, rotate a site's key
(issue 20). A real coordinator (`fedpanfm server start`: SuperLink with TLS and site
authentication on loopback) and the runbook's own commands; no training (~100 s). The
site's signed registration check (`site check`) is the coordinator's answer to each step."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import TINY
from test_deployment import BIN, ROOT, Processes, approve_app, finish, free_port, site_yaml, wait_for_text, wait_online

from fedpanfm.config import config_from_dict
from fedpanfm.data.synthetic import generate_cohort

FEDPANFM = str(BIN / "fedpanfm")


def run(*args: str, ok: bool = True) -> str:
    res = subprocess.run([FEDPANFM, *args], capture_output=True, text=True, timeout=180, cwd=ROOT)
    out = res.stdout + res.stderr
    assert (res.returncode == 0) == ok, f"fedpanfm {' '.join(args)} -> {res.returncode}:\n{out}"
    return out


@pytest.fixture
def processes():  # type: ignore[no-untyped-def]
    procs = Processes()
    try:
        yield procs
    finally:
        procs.stop_all()


@pytest.mark.slow  # ~100 s on 2 shared cores: a dozen CLI starts and a SuperLink
@pytest.mark.timeout(400)
def test_add_remove_and_rotate_a_site_as_the_runbook_says(tmp_path: Path, processes: Processes) -> None:
    raw = {**TINY, "name": "runbook", "device": "cpu", "synth": {"sites": 1, "subjects": 4}}
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(yaml.safe_dump(raw))
    data = generate_cohort(tmp_path / "cohort", config_from_dict(raw))[0]
    certs = tmp_path / "deploy" / "certs"
    run("certs", "init", "--out", str(certs), "--server-host", "127.0.0.1", "--sites", "hospital_a")
    port = free_port()
    deployment = tmp_path / "deployment.yaml"

    def write_sites(names: list[str]) -> None:
        deployment.write_text(yaml.safe_dump({
            "server_host": "127.0.0.1", "bind_host": "127.0.0.1", "port": port, "certs_dir": str(certs),
            "sites": {n: "" for n in names}, "state_dir": str(tmp_path / "deploy" / "coordinator"),
            "experiment": str(experiment), "run_dir": str(tmp_path / "runs"), "app_dir": str(ROOT)}))

    write_sites(["hospital_a"])
    server = processes.start([FEDPANFM, "server", "start", "--coordinator-config", str(deployment)],
                             tmp_path / "server.out")
    wait_for_text(tmp_path / "server.out", "SuperLink serving", server, 120)
    assert "site hospital_a: registered as node" in (tmp_path / "server.out").read_text()

    approved: list[str] = []

    def kit(name: str, approve: bool = True) -> Path:
        return site_yaml(tmp_path / f"kit_{name}", name, data, certs / "sites" / name, port, experiment,
                         approved if approve else [])

    # Every kit approves the release it runs (section 3; a site that approved none does not start):
    # hospital_a from its checkout, the others the hash it published.
    approved.append(approve_app(kit("hospital_a", approve=False)))

    def registered(name: str, yes: bool) -> None:
        out = run("site", "check", "--site-config", str(kit(name)), ok=yes)
        assert ("[ok]   registration" in out) == yes and ("[FAIL] registration" in out) != yes, out

    # Add: a key pair under the same CA, listed in `sites`, registered while the coordinator runs.
    run("certs", "add-site", "--out", str(certs), "--site", "hospital_d")
    assert approve_app(kit("hospital_d", approve=False), "--hash", approved[0]) == approved[0]
    registered("hospital_d", False)  # not before the coordinator registers it
    write_sites(["hospital_a", "hospital_d"])
    out = run("server", "register", "--coordinator-config", str(deployment))
    assert "site hospital_d: registered as node" in out and "site hospital_a: already registered" in out
    registered("hospital_d", True)
    site_d = processes.start([FEDPANFM, "site", "start", "--site-config", str(kit("hospital_d")), "--no-worker"],
                             tmp_path / "site_d.out")
    wait_online(tmp_path / "deploy" / "coordinator" / "flwr_home", 1, 120)
    site_d.send_signal(signal.SIGTERM)
    assert finish(site_d, 60) == 0 and "site hospital_d: stopped (SIGTERM)" in (tmp_path / "site_d.out").read_text()

    # Remove: unregister its node, drop it from `sites`; its key is refused from then on.
    out = run("server", "unregister", "--coordinator-config", str(deployment), "--site", "hospital_d")
    assert "site hospital_d: node" in out and "unregistered" in out and "still listed" in out
    write_sites(["hospital_a"])
    registered("hospital_d", False)
    assert "no node id recorded" in run("server", "unregister", "--coordinator-config", str(deployment),
                                        "--site", "hospital_d", ok=False)

    # Rotate hospital_a's key: new pair, unregister the old node, register the new key.
    old_key = tmp_path / "old_auth.key"
    shutil.copy(certs / "sites" / "hospital_a" / "auth.key", old_key)
    registered("hospital_a", True)
    run("certs", "add-site", "--out", str(certs), "--site", "hospital_a", "--force")
    assert (certs / "sites" / "hospital_a" / "auth.key").read_bytes() != old_key.read_bytes()
    registered("hospital_a", False)  # the new key is not known yet
    run("server", "unregister", "--coordinator-config", str(deployment), "--site", "hospital_a")
    assert "site hospital_a: registered as node" in run("server", "register", "--coordinator-config", str(deployment))
    registered("hospital_a", True)
    # The old key is refused from the unregistration on.
    old_kit = kit("hospital_a")
    old_kit.write_text(old_kit.read_text().replace(str(certs / "sites" / "hospital_a" / "auth.key"), str(old_key)))
    out = run("site", "check", "--site-config", str(old_kit), ok=False)
    assert "[FAIL] registration" in out

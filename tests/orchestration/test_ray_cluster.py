"""Simulation on any Ray: a cluster that was not asked for never breaks a local run, and a
2-node Ray cluster on loopback runs the sites on both nodes with the local run's result.

The cluster is two ``ray start --block`` processes (head and worker, 1 CPU and a 100 MB object
store each, their own temporary folders and ports), each in a process group of its own that the
test stops by its PID; never ``ray stop``, which would stop every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fedpanfm.checkpoint import load_checkpoint
from fedpanfm.tb import read_scalars
from orchestration.simulate import simulate

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiny(cohort: Path, runs: Path) -> list[str]:
    """The quickstart at its smallest: 4 sites of 4 subjects, 2 rounds, no server probe."""
    return [f"cohort={cohort}", f"logging.run_dir={runs}", "synth.sites=4", "synth.subjects=4",
            "federation.rounds=2", "federation.min_sites=4", "data.val_fraction=0.25", "data.batch_size=3",
            "evaluation.server_cohort="]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict]:
    """The tiny federation on a private local Ray while RAY_ADDRESS names a cluster (a dead
    address: what a user's shell keeps after the cluster went away)."""
    tmp = tmp_path_factory.mktemp("local")
    dead = f"127.0.0.1:{_free_port()}"
    before = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = dead
    try:
        summary = simulate(QUICKSTART, tiny(tmp / "cohort", tmp / "runs"), cpus=2)
    finally:
        if before is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = before
    return tmp, dead, summary


@pytest.mark.timeout(900)
def test_a_discoverable_cluster_does_not_break_a_local_run(local_run) -> None:
    _, dead, summary = local_run
    assert summary["rounds"] == 2 and len(summary["sites"]) == 4 and not summary.get("stopped")
    run = Path(summary["run_folder"])
    log = (run / "run.log").read_text()
    assert "started a private local Ray" in log and f"{dead} (RAY_ADDRESS)" in log
    # Where things ran: every site in every round, and each aggregation, on the one local node.
    placement = json.loads((run / "summary.json").read_text())["placement"]
    assert placement == summary["placement"]
    assert len(placement["nodes"]) == 1
    (node,) = placement["nodes"]
    assert sorted(placement["sites"]) == sorted(summary["sites"])
    for recs in placement["sites"].values():
        assert [r["round"] for r in recs] == [1, 2]
        assert all(r["node_id"] == node and r["device"] == "cpu" for r in recs)
    assert [(a["round"], a["mode"], a["node_id"]) for a in placement["aggregation"]] == [(1, "serial", node), (2, "serial", node)]
    tags = read_scalars(run / "tensorboard" / "placement")
    assert [v for _, v in tags["nodes_hosting_sites"]] == [1.0, 1.0]
    assert {f"site/{s}/node" for s in summary["sites"]} <= set(tags)


@contextlib.contextmanager
def loopback_cluster(cpus_per_node: int = 1) -> Iterator[str]:
    """A head and a worker node on 127.0.0.1; yields the head's address."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    # Unix socket paths must stay under 108 bytes: short folders directly in the temp root.
    temps = [Path(tempfile.mkdtemp(prefix=f"fpfm-{n}-", dir="/tmp" if Path("/tmp").is_dir() else None))
             for n in ("h", "w")]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    def node(temp: Path, *extra: str) -> subprocess.Popen[bytes]:
        ports = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                 "metrics-export-port", "runtime-env-agent-port")
        args = [ray_bin, "start", *extra, "--node-ip-address=127.0.0.1", f"--temp-dir={temp}",
                f"--num-cpus={cpus_per_node}", "--object-store-memory=100000000", "--disable-usage-stats", "--block",
                *(f"--{p}={_free_port()}" for p in ports)]
        out = open(temp / "ray-start.log", "wb")
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    port = _free_port()
    address = f"127.0.0.1:{port}"
    procs = [node(temps[0], "--head", f"--port={port}", "--include-dashboard=false",
                  f"--ray-client-server-port={_free_port()}")]
    try:
        deadline = time.monotonic() + 120
        while not (temps[0] / "ray_current_cluster").is_file():
            assert procs[0].poll() is None, (temps[0] / "ray-start.log").read_text()
            assert time.monotonic() < deadline, "the head node did not start in 120 s"
            time.sleep(0.5)
        procs.append(node(temps[1], f"--address={address}"))
        # Flower sizes its actor pool from the nodes alive when it starts: wait for both.
        probe = ("import ray, time, sys\nray.init(address=sys.argv[1], logging_level='ERROR')\n"
                 "t = time.monotonic()\nwhile sum(n['Alive'] for n in ray.nodes()) < 2 and time.monotonic() - t < 120:\n"
                 "    time.sleep(0.5)\nprint(sum(n['Alive'] for n in ray.nodes()))\n")
        alive = subprocess.run([sys.executable, "-c", probe, address], capture_output=True, text=True, env=env,
                               timeout=240).stdout.strip()
        assert alive == "2", f"expected 2 alive nodes, got {alive!r}: {(temps[1] / 'ray-start.log').read_text()}"
        yield address
    finally:
        for p in procs:  # each `ray start --block` leads its own process group: gcs, raylet, workers
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
        for t in temps:
            shutil.rmtree(t, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_node_cluster_hosts_sites_on_both_nodes_with_the_local_result(local_run, tmp_path: Path) -> None:
    tmp, _, local = local_run
    with loopback_cluster() as address:
        summary = simulate(QUICKSTART, tiny(tmp / "cohort", tmp_path / "runs"), ray_address=address)
    assert summary["rounds"] == 2 and sorted(summary["sites"]) == sorted(local["sites"])
    run = Path(summary["run_folder"])
    assert "joined the Ray cluster at" in (run / "run.log").read_text()

    placement = summary["placement"]
    hosts = {r["node_id"] for recs in placement["sites"].values() for r in recs}
    # One 1-CPU actor per node and 4 sites per round: both nodes train sites.
    assert len(hosts) == 2 and hosts <= set(placement["nodes"])
    assert all([r["round"] for r in recs] == [1, 2] for recs in placement["sites"].values())
    assert [a["round"] for a in placement["aggregation"]] == [1, 2]
    tags = read_scalars(run / "tensorboard" / "placement")
    assert max(v for _, v in tags["nodes_hosting_sites"]) == 2.0

    # The same federation as the local run. Each site's round is seeded by (site, round) and
    # the trainer reloads every weight and counter per call, so which actor or node serves a
    # site does not matter; replies may arrive in another order, and the server's float32
    # means then add the same terms in another order: equal up to float32 round-off (measured
    # 1.2e-7 at most after 2 rounds; the bounds leave 10x room for round 2 amplifying it).
    state, _, _ = load_checkpoint(run / "checkpoints" / "latest")
    ref, _, _ = load_checkpoint(Path(local["run_folder"]) / "checkpoints" / "latest")
    assert list(state) == list(ref)
    for k in ref:
        if ref[k].is_floating_point():
            torch.testing.assert_close(state[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
        else:
            assert torch.equal(state[k], ref[k]), k
    assert summary["final_train_loss"] == pytest.approx(local["final_train_loss"], rel=1e-5)
    assert summary["final_val_loss"] == pytest.approx(local["final_val_loss"], rel=1e-5)

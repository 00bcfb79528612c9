"""The site's trainer worker (sites/worker/): wire format, keys, the same reply as in-process
training, one engine across requests, fallback when the worker is dead.

Every worker process a test starts is stopped by its PID in a ``finally``.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from multiprocessing import Pipe
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import global_model_state, one_site_run, site_message, train_message
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.common.config import parse_config_args

from fedpanfm.config import ConfigError, ExperimentConfig
from fedpanfm.federation.protocol import SiteUpdate
from fedpanfm.federation.tensor_codec import BF16_STYPE
from sites.client_app import app
from sites.public_errors import SiteFailure
from sites.runtime import STATE_ARRAYS, STATE_CONFIG
from sites.site_commands import supernode_command
from sites.site_config import load_site_config
from sites.worker.client import WorkerTarget, ping
from sites.worker.supervisor import WorkerProcess
from sites.worker.wire import (
    WorkerProtocolError,
    WorkerUnavailable,
    decode_recorddict,
    encode_recorddict,
    ensure_authkey,
    read_authkey,
    recv_frames,
    send_frames,
)

ROOT = Path(__file__).resolve().parents[2]
NODE = 5


# --------------------------------------------------------------------------- wire format and keys


def test_records_cross_the_wire_unchanged() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    bf16 = Array(dtype="bfloat16", shape=(2,), stype=BF16_STYPE, data=b"\x80\x3f\x00\x40")  # 1.0, 2.0
    rd = RecordDict({
        "arrays": ArrayRecord({"w": Array(a), "b": bf16}),
        "metrics": MetricRecord({"n": 3, "loss": 0.25, "hist": [1.0, 2.5]}),
        "cfg": ConfigRecord({"site": "a", "flag": True, "names": ["x", "y"], "k": 2}),
    })
    left, right = Pipe()
    blobs: list[bytes] = []
    send_frames(left, {"content": encode_recorddict(rd, blobs, "test")}, blobs)
    header, got_blobs = recv_frames(right, "test peer")
    out = decode_recorddict(header["content"], got_blobs, "test")
    assert list(out.keys()) == ["arrays", "metrics", "cfg"]
    np.testing.assert_array_equal(out["arrays"]["w"].numpy(), a)
    assert out["arrays"]["b"].data == bf16.data and out["arrays"]["b"].stype == BF16_STYPE
    assert out["arrays"]["b"].shape == (2,)
    # ints stay ints and floats floats: Flower's records distinguish them.
    assert dict(out["metrics"]) == {"n": 3, "loss": 0.25, "hist": [1.0, 2.5]}
    assert type(out["metrics"]["n"]) is int and type(out["cfg"]["flag"]) is bool
    assert dict(out["cfg"]) == {"site": "a", "flag": True, "names": ["x", "y"], "k": 2}


def test_wire_errors_name_the_record_and_key() -> None:
    with pytest.raises(WorkerProtocolError, match=r"record 'cfg' key 'raw' holds bytes"):
        encode_recorddict(RecordDict({"cfg": ConfigRecord({"raw": b"\x00"})}), [], "test")
    bad = {"arrays": {"kind": "arrays", "items": [{"key": "w", "dtype": "float32", "shape": [2],
                                                    "stype": "numpy.ndarray", "blob": 3}]}}
    with pytest.raises(WorkerProtocolError, match=r"record 'arrays': malformed array entry"):
        decode_recorddict(bad, [b""], "test")
    with pytest.raises(WorkerProtocolError, match=r"record 'm' has no valid 'kind'"):
        decode_recorddict({"m": {"kind": "pickle", "items": {}}}, [], "test")
    left, right = Pipe()
    left.send_bytes(b'{"wire": 99, "blobs": 0}')
    with pytest.raises(WorkerProtocolError, match="wire version 99"):
        recv_frames(right, "peer")
    left.send_bytes(b"\x80\x04not json")  # a pickle opcode is not a header
    with pytest.raises(WorkerProtocolError, match="not JSON"):
        recv_frames(right, "peer")


def test_authkey_file_is_private(tmp_path: Path) -> None:
    key = tmp_path / "state" / "trainer.key"
    with pytest.raises(WorkerUnavailable, match="does not exist"):
        read_authkey(key)
    ensure_authkey(key)
    assert (key.stat().st_mode & 0o777) == 0o600 and len(read_authkey(key)) == 32
    first = key.read_bytes()
    ensure_authkey(key)  # kept, not replaced: a running worker holds it
    assert key.read_bytes() == first
    key.chmod(0o644)
    with pytest.raises(ValueError, match=r"mode 0o644.*chmod 600"):
        read_authkey(key)


def test_thin_clientapp_imports_no_torch() -> None:
    code = "import sys, sites.client_app; print(sorted({'torch', 'deepspeed'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_site_config_names_the_worker(tmp_path: Path) -> None:
    kit = tmp_path / "kit"
    kit.mkdir()
    (kit / "site.yaml").write_text("site_name: hosp_a\ncoordinator: 127.0.0.1:9092\n")
    site = load_site_config(kit / "site.yaml")
    assert site.worker.enabled and site.worker.state_dir == str(kit / "state")
    nc = parse_config_args([site.node_config(worker=True)])
    assert nc["trainer-socket"] == str(kit / "state" / "trainer.sock")
    assert nc["trainer-key"] == str(kit / "state" / "trainer.key") and nc["trainer-fallback"] == "local"
    assert WorkerTarget.from_node_config(nc) == WorkerTarget(kit / "state" / "trainer.sock",
                                                             kit / "state" / "trainer.key", "local")
    assert "trainer-socket" not in parse_config_args([site.node_config()])
    assert WorkerTarget.from_node_config(parse_config_args([site.node_config()])) is None
    if subprocess.run(["which", "flower-supernode"], capture_output=True).returncode == 0:
        cmd = supernode_command(site, worker=True)
        assert cmd[cmd.index("--node-config") + 1] == site.node_config(worker=True)
    (kit / "site.yaml").write_text("site_name: hosp_a\ncoordinator: 127.0.0.1:9092\nworker:\n  fallback: maybe\n")
    with pytest.raises(ConfigError, match="worker.fallback"):
        load_site_config(kit / "site.yaml")
    (kit / "site.yaml").write_text(f"site_name: hosp_a\ncoordinator: 127.0.0.1:9092\nworker:\n  state_dir: {'d' * 120}\n")
    with pytest.raises(ConfigError, match=r"worker.state_dir.*longer than 107 bytes"):
        load_site_config(kit / "site.yaml")
    with pytest.raises(ValueError, match="trainer-fallback='sometimes'"):
        WorkerTarget.from_node_config({"trainer-socket": "/x.sock", "trainer-fallback": "sometimes"})


# --------------------------------------------------------------------------- a real worker


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExperimentConfig, dict[str, str], dict[str, str], Path]:
    """A one-site tiny cohort, its run config, the deployment node config naming it, a scratch folder."""
    tmp = tmp_path_factory.mktemp("worker")
    cfg, run_config = one_site_run(tmp)
    # A deployed site takes the experiment config's text, never a path (sites/run_config_allowlist.py).
    run_config = {**run_config, "config-yaml": Path(run_config["config"]).read_text()}
    site_dir = sorted(p for p in Path(cfg.cohort).iterdir() if (p / "manifest.csv").is_file())[0]
    node_config = {"site-name": site_dir.name, "data-dir": str(site_dir)}
    return cfg, run_config, node_config, tmp


def _start_worker(sock: Path, key: Path, log: Path) -> subprocess.Popen[bytes]:
    ensure_authkey(key)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same threads as this process
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "sites.worker", "--socket", str(sock), "--key", str(key)],
                                stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            ping(WorkerTarget(sock, key))
            return proc
        except WorkerUnavailable:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"worker did not answer:\n{log.read_text()}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _assert_same_update(a: SiteUpdate, b: SiteUpdate) -> None:
    assert a.site == b.site and a.num_examples == b.num_examples and a.steps == b.steps
    assert set(a.state) == set(b.state)
    for k in a.state:
        assert a.state[k].shape == b.state[k].shape, k
        torch.testing.assert_close(a.state[k], b.state[k], rtol=1e-4, atol=1e-5, msg=k)
    torch.testing.assert_close(a.organ_subjects, b.organ_subjects)
    torch.testing.assert_close(a.gate_mass, b.gate_mass, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.saliency, b.saliency, rtol=1e-4, atol=1e-5)
    assert set(a.metrics) == set(b.metrics)
    for k in a.metrics:
        if not k.startswith("time/"):
            assert a.metrics[k] == pytest.approx(b.metrics[k], rel=1e-4, abs=1e-5), k


def test_worker_replies_as_in_process_and_keeps_one_engine(site) -> None:  # type: ignore[no-untyped-def]
    cfg, run_config, node_config, tmp = site
    sock, key = tmp / "state" / "trainer.sock", tmp / "state" / "trainer.key"
    organs = cfg.data.organ_set().names
    local = Context(run_id=1, node_id=NODE, node_config=dict(node_config), state=RecordDict(), run_config=run_config)
    remote = Context(run_id=1, node_id=NODE, state=RecordDict(), run_config=run_config,
                     node_config={**node_config, "trainer-socket": str(sock), "trainer-key": str(key),
                                  "trainer-fallback": "fail"})
    proc = _start_worker(sock, key, tmp / "worker.log")
    try:
        state = global_model_state(cfg)
        for rnd in (1, 2):
            msg = train_message(cfg, state, rnd, NODE)
            mine = SiteUpdate.from_recorddict(app(msg, local).content, organs)
            theirs = SiteUpdate.from_recorddict(app(msg, remote).content, organs)
            _assert_same_update(mine, theirs)
            # What the site keeps between rounds came back into the ClientApp's context.
            assert set(remote.state.keys()) == set(local.state.keys()) == {STATE_ARRAYS, STATE_CONFIG}
            assert dict(remote.state[STATE_CONFIG]) == dict(local.state[STATE_CONFIG])
            kept_l, kept_r = (c.state[STATE_ARRAYS].to_torch_state_dict() for c in (local, remote))
            assert set(kept_l) == set(kept_r) and kept_l
            for k in kept_l:
                torch.testing.assert_close(kept_l[k], kept_r[k], rtol=1e-4, atol=1e-5)
            state = {**state, **mine.state}
        eval_msg = site_message(RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord()}), "evaluate", 2, NODE)
        ev_l, ev_r = app(eval_msg, local).content["metrics"], app(eval_msg, remote).content["metrics"]
        assert ev_l["num-examples"] == ev_r["num-examples"] > 0
        assert ev_r["val/loss"] == pytest.approx(ev_l["val/loss"], rel=1e-4)
        stats = ping(WorkerTarget(sock, key))
        assert stats["pid"] == proc.pid and stats["requests"] == 3 and stats["engine_builds"] == 1
        # A failure inside the worker comes back as an error, not as a fallback.
        bad = site_message(RecordDict({"config": ConfigRecord()}), "evaluate", 1, NODE)
        with pytest.raises(SiteFailure, match="evaluate failed at this site: WorkerError") as failed:
            app(bad, remote)  # the coordinator sees the redacted reason, the site the cause
        assert re.search(r"trainer worker: ValueError: .*no ArrayRecord 'arrays'", str(failed.value.__cause__))
    finally:
        _stop(proc)
    assert proc.returncode == 0 and not sock.exists()  # SIGTERM closes the listener and its socket


def test_dead_worker_falls_back_or_fails_clearly(site, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    cfg, run_config, node_config, tmp = site
    sock, key = tmp / "dead" / "trainer.sock", tmp / "dead" / "trainer.key"
    sock.parent.mkdir()
    supervisor = WorkerProcess(sock, key, {**os.environ}, tmp / "dead" / "worker.log", restarts=1)
    try:
        first = supervisor.start(timeout_s=180)["pid"]
        assert supervisor.proc is not None and supervisor.proc.pid == first
        os.kill(first, signal.SIGKILL)  # dies like an OOM kill: the socket file stays behind
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # the supervisor restarts it once
            try:
                second = ping(WorkerTarget(sock, key))["pid"]
                break
            except WorkerUnavailable:
                time.sleep(0.3)
        else:
            raise AssertionError((tmp / "dead" / "worker.log").read_text())
        assert second != first
        os.kill(second, signal.SIGKILL)  # no restart left
        supervisor.proc.wait(timeout=30)
    finally:
        supervisor.stop()
    assert sock.exists()  # stale: connecting is refused
    with socket.socket(socket.AF_UNIX) as s, pytest.raises(ConnectionRefusedError):
        s.connect(str(sock))

    msg = train_message(cfg, global_model_state(cfg), 1, NODE)
    dead = {**node_config, "trainer-socket": str(sock), "trainer-key": str(key)}
    context = Context(run_id=1, node_id=NODE, node_config=dead, state=RecordDict(), run_config=run_config)
    with caplog.at_level(logging.WARNING, logger="sites.client_app"):
        reply = app(msg, context)
    update = SiteUpdate.from_recorddict(reply.content, cfg.data.organ_set().names)
    assert update.site == node_config["site-name"] and update.steps > 0
    assert any("no trainer worker at" in r.message and "train runs in this ClientApp process instead" in r.message
               for r in caplog.records)
    strict = Context(run_id=1, node_id=NODE, state=RecordDict(), run_config=run_config,
                     node_config={**dead, "trainer-fallback": "fail"})
    with pytest.raises(SiteFailure, match="train failed at this site: WorkerUnavailable") as failed:
        app(msg, strict)
    assert isinstance(failed.value.__cause__, WorkerUnavailable)
    assert f"no trainer worker at {sock}" in str(failed.value.__cause__) and str(sock) not in str(failed.value)

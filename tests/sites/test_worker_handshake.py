"""The trainer worker's handshake (issue 15, item 6): mutual, constant-time, and bounded in time:
a client that says nothing cannot hold the worker, a wrong key is refused both ways."""

from __future__ import annotations

import inspect
import os
import socket
import threading
import time
from multiprocessing.connection import AuthenticationError, Listener
from pathlib import Path

import pytest

import sites.worker.handshake as handshake
from sites.worker.client import WorkerTarget, ping
from sites.worker.handshake import accept_authenticated, connect_authenticated
from sites.worker.server import TrainerWorker
from sites.worker.wire import WorkerUnavailable, ensure_authkey


@pytest.fixture
def worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(handshake, "HANDSHAKE_TIMEOUT_S", 0.5)
    state = tmp_path / "st"
    sock, key = state / "t.sock", state / "t.key"
    ensure_authkey(key)
    server = TrainerWorker(sock, key)
    thread = threading.Thread(target=server.serve, kwargs={"max_requests": 3}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    yield WorkerTarget(sock, key), thread


def test_a_silent_client_cannot_hold_the_worker(worker) -> None:  # type: ignore[no-untyped-def]
    target, thread = worker
    with socket.socket(socket.AF_UNIX) as silent:
        silent.connect(str(target.socket))  # connects, then never answers the challenge
        t0 = time.monotonic()
        stats = ping(target, timeout_s=10)  # served once the worker gave up on the silent one
        assert 0.3 < time.monotonic() - t0 < 5 and stats["pid"] == os.getpid()
    for _ in range(2):
        ping(target)
    thread.join(timeout=10)
    assert not thread.is_alive()  # three requests served; the silent client was not counted


def test_a_wrong_key_is_refused_both_ways(worker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    target, _ = worker
    wrong = tmp_path / "wrong.key"
    ensure_authkey(wrong)
    with pytest.raises(WorkerUnavailable, match="refused the key"):
        ping(WorkerTarget(target.socket, wrong))
    ping(target)  # the worker goes on

    # A fake worker without the key: the client does not send it anything after the challenge.
    fake_path = tmp_path / "fake.sock"
    with Listener(str(fake_path), family="AF_UNIX") as fake:
        def impostor() -> None:
            with fake.accept() as conn:
                conn.send_bytes(handshake.CHALLENGE + os.urandom(handshake.NONCE_BYTES))
                conn.recv_bytes(256)
                conn.send_bytes(handshake.WELCOME + os.urandom(32))
        t = threading.Thread(target=impostor, daemon=True)
        t.start()
        with pytest.raises(AuthenticationError, match="could not prove it holds the key"):
            connect_authenticated(fake_path, target.key.read_bytes(), timeout_s=5)
        t.join(timeout=5)


def test_digests_are_compared_in_constant_time_and_the_client_read_is_bounded(tmp_path: Path) -> None:
    for fn in (handshake.authenticate_client, handshake.authenticate_worker):
        source = inspect.getsource(fn)
        assert "hmac.compare_digest" in source and "==" not in source.replace("reply == FAILURE", "")
    # A worker that accepted but never speaks: the client gives up after its timeout.
    path = tmp_path / "mute.sock"
    with Listener(str(path), family="AF_UNIX") as mute:
        t0 = time.monotonic()
        with pytest.raises(OSError):
            connect_authenticated(path, b"k" * 32, timeout_s=0.5)
        assert time.monotonic() - t0 < 5
        assert accept_authenticated is handshake.accept_authenticated and mute is not None

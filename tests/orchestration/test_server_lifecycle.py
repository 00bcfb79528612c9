"""The coordinator's life-cycle without a deployment: the keeper ends the whole process tree
(detached grandchildren included) when its owner is SIGKILLed or its command crashes; a new
start ends what a dead owner left by the pid file, never a process that merely reuses a
recorded PID; the port check ignores TIME_WAIT.

Every process here is started by the test and checked (and, on failure, ended) by its PID.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from fedpanfm.supervision import AlreadyRunning, PidFile, ProcessRecord, clean_stale
from orchestration.coordinator import ensure_port_free

ROOT = Path(__file__).resolve().parents[2]

# The kept command: starts a grandchild in a session of its own (as Flower's SuperExec is
# started), writes both PIDs, then sleeps, or exits with 3 when told to (a crashed SuperLink).
CHILD = textwrap.dedent("""
    import subprocess, sys, time
    g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    open(sys.argv[1], "w").write(f"{g.pid}")
    if sys.argv[2] == "crash":
        sys.exit(3)
    time.sleep(300)
""")

# The owner (`fedpanfm server start` in miniature): starts the keeper with a pipe it holds.
OWNER = textwrap.dedent("""
    import json, os, subprocess, sys
    from fedpanfm.supervision import keeper_command
    child, pid_file = json.loads(sys.argv[1]), sys.argv[2]
    keeper = subprocess.Popen(keeper_command(child, pid_file, os.getpid(), grace_s=2.0), stdin=subprocess.PIPE)
    print(keeper.pid, flush=True)
    sys.exit(keeper.wait())
""")


def _wait(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _start_owner(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[str], PidFile, Path]:
    pid_file = PidFile(tmp_path / "coordinator.pid")
    pids = tmp_path / "grandchild.pid"
    child = [sys.executable, "-c", CHILD, str(pids), mode]
    owner = subprocess.Popen([sys.executable, "-c", OWNER, json.dumps(child), str(pid_file.path)],
                             stdout=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True)
    return owner, pid_file, pids


def _end(pids: list[int]) -> None:
    for pid in pids:  # only if a test failed: nothing of ours may outlive it
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass


def test_keeper_ends_the_tree_when_its_owner_is_sigkilled(tmp_path: Path) -> None:
    owner, pid_file, gpid_file = _start_owner(tmp_path, "sleep")
    started: list[int] = [owner.pid]
    try:
        keeper_pid = int(owner.stdout.readline())
        started.append(keeper_pid)
        _wait(lambda: gpid_file.is_file() and gpid_file.read_text().strip(), 30, "the kept command did not start")
        grandchild = int(gpid_file.read_text())
        started.append(grandchild)
        # The pid file lists the kept command and its detached grandchild, with start times.
        _wait(lambda: (r := pid_file.read()) is not None and grandchild in {p.pid for p in r[2]}, 10,
              "the pid file never listed the grandchild")
        owner_rec, keeper_rec, procs = pid_file.read()
        assert owner_rec.pid == owner.pid and keeper_rec.pid == keeper_pid and len(procs) == 2
        assert os.getsid(grandchild) == grandchild  # detached: a process-group kill would miss it
        tree = [ProcessRecord.of(psutil.Process(p)) for p in (keeper_pid, *(r.pid for r in procs))]

        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(timeout=10)
        _wait(lambda: all(r.process() is None for r in tree), 20,
              f"still running after the owner's SIGKILL: {[r for r in tree if r.process()]}")
        assert not pid_file.path.exists()
    finally:
        _end(started)


def test_keeper_ends_the_tree_when_its_command_crashes(tmp_path: Path) -> None:
    owner, pid_file, gpid_file = _start_owner(tmp_path, "crash")
    started = [owner.pid]
    try:
        keeper_pid = int(owner.stdout.readline())
        started.append(keeper_pid)
        assert owner.wait(timeout=30) == 3  # the keeper exits with the command's code
        grandchild = int(gpid_file.read_text())
        started.append(grandchild)
        # Orphaned by the crash, re-parented to the keeper (subreaper), ended with it.
        _wait(lambda: not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE,
              10, "the crashed command's grandchild survived")
        assert not psutil.pid_exists(keeper_pid) and not pid_file.path.exists()
    finally:
        _end(started)


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)


def test_next_start_ends_what_a_dead_owner_left_and_nothing_else(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_rec = ProcessRecord.of(psutil.Process(dead.pid))
    dead.wait()
    left, keeper = _sleeper(), _sleeper()
    try:
        me = psutil.Process()
        # Our own PID under another start time: a process that reuses a recorded PID.
        reused = ProcessRecord(me.pid, me.create_time() - 1000.0, "flower-superlink")
        pid_file = PidFile(tmp_path / "coordinator.pid")
        pid_file.write(dead_rec, ProcessRecord.of(psutil.Process(keeper.pid)),
                       [ProcessRecord.of(psutil.Process(left.pid)), reused])
        ended = clean_stale(pid_file, "coordinator", grace_s=5.0)
        assert sorted(r.pid for r in ended) == sorted([left.pid, keeper.pid])
        assert not psutil.pid_exists(left.pid) and not psutil.pid_exists(keeper.pid)  # ended (and reaped)
        assert me.is_running() and not pid_file.path.exists()
        assert clean_stale(pid_file, "coordinator") == []  # no pid file: nothing to do
    finally:
        _end([left.pid, keeper.pid])


def test_a_live_owner_is_refused_and_a_damaged_pid_file_is_not_ignored(tmp_path: Path) -> None:
    me = ProcessRecord.of(psutil.Process())
    pid_file = PidFile(tmp_path / "coordinator.pid")
    pid_file.write(me, me, [])
    with pytest.raises(AlreadyRunning, match=f"already running \\(pid {os.getpid()}"):
        clean_stale(pid_file, "coordinator")
    assert pid_file.path.exists()
    pid_file.path.write_text(json.dumps({"owner": {"pid": "x"}, "processes": []}))
    with pytest.raises(ValueError, match="coordinator.pid: unreadable pid file"):
        clean_stale(pid_file, "coordinator")


def test_port_check_ignores_time_wait_but_not_a_listener() -> None:
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the SuperLink's server (uvicorn) binds
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(OSError, match=f"127.0.0.1:{port} is in use"):
            ensure_port_free("127.0.0.1", port)
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = listener.accept()
        conn.close()  # the server side closes first: its end of the connection enters TIME_WAIT
        time.sleep(0.2)
        client.close()
    time.sleep(0.2)
    # A plain bind (no SO_REUSEADDR) fails here, as after a killed SuperLink.
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))
    ensure_port_free("127.0.0.1", port)

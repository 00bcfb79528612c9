"""The trainer worker as a child process of ``fedpanfm site start``, restarted when it dies."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sites.worker.client import WorkerTarget, ping
from sites.worker.wire import WorkerUnavailable, ensure_authkey


class WorkerProcess:
    """The worker as a child process of ``fedpanfm site start``, restarted when it dies.

    Args:
        socket_path: its socket.
        key_path: its auth key file (created here, mode 0600, if missing).
        env: its environment (the SuperNode's: threads, CUDA_VISIBLE_DEVICES).
        log_path: its log file (appended).
        restarts: how many times a worker that died is started again.
    """

    def __init__(self, socket_path: Path, key_path: Path, env: Mapping[str, str], log_path: Path,
                 restarts: int = 10) -> None:
        self.target = WorkerTarget(socket_path, key_path)
        self.env, self.log_path, self.restarts = dict(env), log_path, restarts
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._watch: threading.Thread | None = None

    def _spawn(self) -> None:
        cmd = [sys.executable, "-m", "sites.worker", "--socket", str(self.target.socket),
               "--key", str(self.target.key), "--parent-pid", str(os.getpid())]
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=self.env)

    def start(self, timeout_s: float = 120.0) -> dict[str, Any]:
        """Start the worker and wait until it answers; its stats. Raises naming the log on failure."""
        self.target.socket.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.target.socket.parent, 0o700)
        ensure_authkey(self.target.key)
        self._spawn()
        stats = self._wait_ready(timeout_s)
        self._watch = threading.Thread(target=self._supervise, name="trainer-worker-watch", daemon=True)
        self._watch.start()
        return stats

    def _wait_ready(self, timeout_s: float) -> dict[str, Any]:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"trainer worker exited ({self.proc.returncode}) at start; see {self.log_path}")
            try:
                return ping(self.target)
            except WorkerUnavailable:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"trainer worker did not answer within {timeout_s:.0f} s; see {self.log_path}")

    def _supervise(self) -> None:
        for attempt in range(self.restarts + 1):
            assert self.proc is not None
            code = self.proc.wait()
            if self._stopping.is_set() or attempt == self.restarts:
                return
            print(f"trainer worker exited ({code}); restarting ({attempt + 1}/{self.restarts}), see "
                  f"{self.log_path}", file=sys.stderr, flush=True)
            time.sleep(2.0)
            if self._stopping.is_set():
                return
            self._spawn()

    def stop(self) -> None:
        """Stop the worker by its PID (SIGTERM, then SIGKILL after 10 s)."""
        self._stopping.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

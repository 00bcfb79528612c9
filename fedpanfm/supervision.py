"""A process tree that ends with its owner: a keeper process, a pid file, and stale-tree cleanup.

Why: Flower 1.41's SuperLink starts its SuperExec in a session of its own, the SuperExec starts
the ServerApp, the ServerApp starts Ray's daemons, and the SuperNode starts a ClientApp process
per message. Killing the process we started (or its process group) leaves the rest running, and
a new coordinator then finds its port taken. Our design, for any command whose whole tree must
end with the command that owns it (``fedpanfm server start``):

- the owner starts a **keeper** (``python -m fedpanfm.supervision``) which marks itself the
  *child subreaper* (Linux ``PR_SET_CHILD_SUBREAPER``): every process below it that is orphaned,
  whatever session it made, is re-parented to the keeper, so the whole tree stays below it;
- the keeper's stdin is a pipe only the owner holds: when the owner ends in any way, SIGKILL
  included, the keeper reads end-of-file and ends the tree (SIGTERM, then SIGKILL after a grace
  period); it does the same when its command exits (a crashed SuperLink takes its ServerApp and
  Ray with it) or when it gets SIGTERM;
- the keeper keeps a **pid file** listing owner, keeper and every process of the tree, each with
  its start time (a PID the kernel has since reused is never taken for ours); a new start reads
  it, refuses while the recorded owner lives, and otherwise ends whatever of the tree is still
  running (the keeper itself was SIGKILLed, or the machine's init adopted the tree).

Commands that do not need to survive their own SIGKILL (``fedpanfm site start``) mark
themselves subreaper with :func:`set_child_subreaper` and end their descendants on the way out
with :func:`end_descendants`.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import psutil

#: ``prctl`` option numbers (linux/prctl.h).
_PR_SET_CHILD_SUBREAPER = 36
#: Two start times within this many seconds are the same process (psutil rounds them).
_SAME_START_S = 0.05


class AlreadyRunning(RuntimeError):
    """The pid file's owner is alive: another instance runs on the same state folder."""


def set_child_subreaper() -> bool:
    """Make orphaned descendants of this process re-parent to it (Linux); False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


@dataclass(frozen=True)
class ProcessRecord:
    """A process as the pid file records it: the PID and its start time tell it apart from a
    later process that got the same PID."""

    pid: int
    started: float
    name: str = ""

    @classmethod
    def of(cls, proc: psutil.Process) -> "ProcessRecord":
        with proc.oneshot():
            name = proc.name()
            try:
                # Linux truncates names to 15 characters ("flower-superlin"); the script path has it whole.
                name = next((Path(a).name for a in proc.cmdline() if Path(a).name.startswith(name)), name)
            except (psutil.AccessDenied, psutil.ZombieProcess):
                pass
            return cls(proc.pid, proc.create_time(), name)

    def process(self) -> psutil.Process | None:
        """The live process this record names; None when it ended or the PID was reused."""
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.started) > _SAME_START_S or proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "started": self.started, "name": self.name}

    @classmethod
    def from_json(cls, d: Any, where: str) -> "ProcessRecord":
        if not isinstance(d, dict) or not isinstance(d.get("pid"), int) or not isinstance(d.get("started"), (int, float)):
            raise ValueError(f"{where}: malformed process entry {str(d)[:200]}")
        return cls(int(d["pid"]), float(d["started"]), str(d.get("name", "")))


def descendants(pid: int) -> list[psutil.Process]:
    """Every live process below ``pid`` (children first met first); [] when ``pid`` is gone."""
    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if p.is_running()]
    except psutil.NoSuchProcess:
        return []


def end_processes(procs: Iterable[psutil.Process], grace_s: float = 10.0) -> list[int]:
    """SIGTERM each process, SIGKILL the ones still alive after ``grace_s``; the PIDs that were ended.

    Args:
        procs: the processes (already gone ones are skipped).
        grace_s: how long a process may take to exit on SIGTERM.
    """
    procs = list(procs)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5.0)
    return [p.pid for p in procs]


def end_descendants(grace_s: float = 10.0, keep: Iterable[int] = ()) -> list[int]:
    """End every process below this one (those that outlived their own parent included, when
    this process is a subreaper); the PIDs ended.

    Args:
        grace_s: SIGTERM grace before SIGKILL.
        keep: PIDs that, with their own descendants, are left running.
    """
    ended: list[int] = []
    # A process may start a child while we end its siblings: repeat until none is left.
    for _ in range(5):
        kept = set(keep)
        for pid in list(kept):
            kept |= {p.pid for p in descendants(pid)}
        procs = [p for p in descendants(os.getpid()) if p.pid not in kept]
        if not procs:
            break
        ended += end_processes(procs, grace_s)  # psutil reaps those that are our children
    return ended


def _reap() -> list[tuple[int, int]]:
    """Collect exited children without blocking: ``(pid, exit code)`` each."""
    out: list[tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return out
        if pid == 0:
            return out
        out.append((pid, os.waitstatus_to_exitcode(status)))


# --------------------------------------------------------------------------- pid file


@dataclass
class PidFile:
    """``<state_dir>/<name>.pid``: JSON with ``owner``, ``keeper`` and ``processes`` records.

    Written whole to a temporary file and renamed into place, so a reader never sees half of it.
    """

    path: Path

    def write(self, owner: ProcessRecord, keeper: ProcessRecord, processes: list[ProcessRecord],
              extra: dict[str, Any] | None = None) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"owner": owner.to_json(), "keeper": keeper.to_json(),
                                   "processes": [p.to_json() for p in processes], **(extra or {})}, indent=1))
        os.replace(tmp, self.path)

    def read(self) -> tuple[ProcessRecord, ProcessRecord, list[ProcessRecord]] | None:
        """(owner, keeper, processes); None when there is no pid file. A file that does not
        parse raises ValueError naming it (it is never silently ignored: it may name live processes)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict) or not isinstance(raw.get("processes"), list):
                raise ValueError("not an object with 'processes'")
            where = str(self.path)
            return (ProcessRecord.from_json(raw.get("owner"), where), ProcessRecord.from_json(raw.get("keeper"), where),
                    [ProcessRecord.from_json(p, where) for p in raw["processes"]])
        except (json.JSONDecodeError, ValueError) as exc:
            raise ValueError(f"{self.path}: unreadable pid file ({exc}); check that nothing it names still "
                             "runs, then delete it") from None

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def clean_stale(pid_file: PidFile, what: str, grace_s: float = 10.0) -> list[ProcessRecord]:
    """End what a dead owner's tree left running; the records of the processes ended.

    Args:
        pid_file: the pid file of the previous start.
        what: names the owner in the error (e.g. "coordinator").
        grace_s: SIGTERM grace before SIGKILL.

    Raises:
        AlreadyRunning: the recorded owner is alive (another instance uses this state folder).
    """
    recorded = pid_file.read()
    if recorded is None:
        return []
    owner, keeper, processes = recorded
    if owner.process() is not None:
        raise AlreadyRunning(f"a {what} is already running (pid {owner.pid}, pid file {pid_file.path}); "
                             "stop it first (SIGTERM or Ctrl-C)")
    # The keeper first, so it does not end its tree at the same time as we do; then the rest.
    live = [(r, p) for r in [keeper, *processes] if (p := r.process()) is not None]
    end_processes([p for _, p in live], grace_s)
    pid_file.remove()
    return [r for r, _ in live]


# --------------------------------------------------------------------------- the keeper


def keeper_command(cmd: list[str], pid_file: Path, owner_pid: int, grace_s: float = 10.0) -> list[str]:
    """The command line that runs ``cmd`` under a keeper owned by ``owner_pid``.

    Start it with ``stdin=subprocess.PIPE`` and keep the pipe open for as long as the tree
    should live; closing it (or the owner's death) ends the tree.
    """
    return [sys.executable, "-m", "fedpanfm.supervision", "--pid-file", str(pid_file), "--owner-pid",
            str(owner_pid), "--grace", str(grace_s), "--", *cmd]


def keep(cmd: list[str], pid_file: PidFile, owner_pid: int, grace_s: float = 10.0, poll_s: float = 0.5) -> int:
    """Run ``cmd`` as the keeper: until it exits, the owner is gone, stdin closes or SIGTERM;
    then end the whole tree. Returns ``cmd``'s exit code (0 when stopped from outside).

    Args:
        cmd: the command (its stdout / stderr are the keeper's).
        pid_file: where the tree is recorded (removed at the end).
        owner_pid: the owning process; the keeper refuses to start if it already died.
        grace_s: SIGTERM grace before SIGKILL when ending the tree.
        poll_s: how often the tree is re-read into the pid file.
    """
    set_child_subreaper()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())

    def watch_stdin() -> None:
        # The raw descriptor: a daemon thread blocked in the buffered reader aborts interpreter exit.
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        stop.set()

    threading.Thread(target=watch_stdin, name="owner-pipe", daemon=True).start()
    try:
        owner = ProcessRecord.of(psutil.Process(owner_pid))
    except psutil.NoSuchProcess:
        return 1
    if os.getppid() != owner_pid:
        return 1  # the owner died before we started: nothing to keep
    me = ProcessRecord.of(psutil.Process())
    child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    code: int | None = None
    written: list[ProcessRecord] | None = None
    try:
        while True:
            for pid, status in _reap():
                if pid == child.pid:
                    code = status
                    child.returncode = status  # reaped here: Popen must not wait for it again
            if code is not None or stop.is_set():
                break
            tree = []
            for p in descendants(os.getpid()):
                try:
                    tree.append(ProcessRecord.of(p))
                except psutil.NoSuchProcess:
                    continue
            if tree != written:
                pid_file.write(owner, me, tree, {"command": cmd})
                written = tree
            stop.wait(poll_s)
    finally:
        end_descendants(grace_s)
        for pid, status in _reap():
            if pid == child.pid and code is None:
                child.returncode = status
        pid_file.remove()
    return code if code is not None else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m fedpanfm.supervision --pid-file F --owner-pid P -- CMD...``."""
    ap = argparse.ArgumentParser(prog="python -m fedpanfm.supervision", description=__doc__.split("\n")[0])
    ap.add_argument("--pid-file", required=True, type=Path)
    ap.add_argument("--owner-pid", required=True, type=int)
    ap.add_argument("--grace", type=float, default=10.0)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("no command to keep")
    return keep(cmd, PidFile(args.pid_file), args.owner_pid, args.grace)


if __name__ == "__main__":
    sys.exit(main())

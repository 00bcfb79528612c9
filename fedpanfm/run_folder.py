"""Run folders: one naming scheme for every job, and the record that makes a folder explain itself.

Every job that writes a run folder (``simulate``, ``pretrain``, ``evaluate``, ``study``, a
federation run on the coordinator) names it ``<logging.run_dir>/<name>-<command>-<YYYYmmdd-HHMMSS>``
unless ``--out`` names one, and starts it with :func:`record_provenance`:

    run.log            every log record of the run (fedpanfm/run_log.py)
    command.txt        the exact command, one line per invocation (a resume adds one)
    environment.json   per invocation: time, host, platform, Python, the versions of torch, flwr,
                       ray, deepspeed, monai and fedpanfm, the git commit (and whether the
                       checkout had uncommitted changes) when run from a checkout, the device

Our choices: versions are read from the installed distributions' metadata (nothing is
imported for it); git is asked with a 5-second limit and its absence is recorded, not an error.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

#: Distributions whose versions a run records.
PACKAGES = ("fedpanfm", "torch", "flwr", "ray", "deepspeed", "monai", "numpy")
COMMAND_FILE = "command.txt"
ENVIRONMENT_FILE = "environment.json"


def new_run_folder(run_dir: str | Path, name: str, command: str) -> Path:
    """``<run_dir>/<name>-<command>-<YYYYmmdd-HHMMSS>``, with ``-<n>`` appended if that exists.

    Args:
        run_dir: ``cfg.logging.run_dir``.
        name: the experiment name (``cfg.name``).
        command: the job, e.g. ``"simulate"`` or ``"pretrain"``.
    """
    base = Path(run_dir) / f"{name}-{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    return path


def package_versions(packages: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (None: not installed)."""
    out: dict[str, str | None] = {}
    for p in packages:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def git_state(where: Path | None = None) -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the checkout holding ``where`` (default: this package's
    source); None when it is not a git checkout or git is unavailable."""
    where = Path(where) if where is not None else Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=5,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty, "checkout": str(where)}


def device_description(device: str) -> dict[str, Any]:
    """The configured device and what this machine offers (CUDA devices by name, CPU cores)."""
    info: dict[str, Any] = {"configured": device, "cpu_count": os.cpu_count()}
    if "torch" in sys.modules:  # a run command has imported it already; do not pay for it here
        torch = sys.modules["torch"]
        info["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
            if torch.cuda.is_available() else []
    return info


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as typed: ``fedpanfm <args>`` for the console script, else the interpreter's argv."""
    argv = list(sys.argv if argv is None else argv)
    if argv and Path(argv[0]).name == "fedpanfm":
        argv[0] = "fedpanfm"
    elif argv and argv[0].endswith(".py"):
        argv = [Path(sys.executable).name, *argv]
    return shlex.join(argv)


def record_provenance(folder: Path, device: str, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Append this invocation to ``command.txt`` and ``environment.json`` in ``folder``.

    Args:
        folder: the run folder (created if missing).
        device: the configured device (``cfg.device``).
        argv: the command's argv (default ``sys.argv``).

    Returns:
        The environment entry written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cmd = command_line(argv)
    with open(folder / COMMAND_FILE, "a", encoding="utf-8") as f:
        f.write(f"# {_now()} in {os.getcwd()}\n{cmd}\n")
    return record_environment(folder, device, cmd)


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def record_environment(folder: Path, device: str, command: str) -> dict[str, Any]:
    """Append this process's entry to ``environment.json`` in ``folder`` (created if missing).

    A deployed run has two: the operator's ``federation run`` (with the command it also put in
    ``command.txt``) and the ServerApp process that ran the federation (orchestration/deployed_run.py).

    Args:
        folder: the run folder.
        device: the configured device (``cfg.device``).
        command: what this process is, as the entry's ``command``.

    Returns:
        The entry written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entry = {
        "time": _now(),
        "command": command,
        "cwd": os.getcwd(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "git": git_state(),
        "device": device_description(device),
    }
    path = folder / ENVIRONMENT_FILE
    sessions: list[dict[str, Any]] = []
    if path.is_file():
        try:
            sessions = list(json.loads(path.read_text()).get("sessions", []))
        except (ValueError, AttributeError):
            sessions = []  # a damaged record is replaced rather than stopping the run
    path.write_text(json.dumps({"sessions": [*sessions, entry]}, indent=2))
    return entry


__all__ = ["COMMAND_FILE", "ENVIRONMENT_FILE", "PACKAGES", "command_line", "git_state", "new_run_folder",
           "package_versions", "record_environment", "record_provenance"]

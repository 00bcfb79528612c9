"""The run folder and the output of a deployed ServerApp (the one ``fedpanfm server start``'s
SuperLink starts for each ``federation run``).

A simulation's run folder is prepared by ``fedpanfm simulate`` in its own process
(orchestration/simulate.py). In a deployment the ServerApp runs in a process the SuperLink
starts, so it prepares the folder itself, in :func:`deployed_run`:

- ``run.log``: every log record of the ServerApp process (Flower's, Ray's, ours), appended, so a
  resumed run continues it (fedpanfm/run_log.py);
- ``environment.json``: an entry for the ServerApp process (host, packages, device), beside the
  one ``federation run`` wrote with the operator's command in ``command.txt``
  (orchestration/deploy_commands.py); the ServerApp never sees that command, and its own argv
  holds Flower's launch token, which is not written anywhere;
- our log records on stderr, which Flower's ServerApp process mirrors into the run's log
  (``flwr log``, ``federation run``'s stream): fedpanfm's per-round lines as
  ``INFO fedpanfm.rounds: <line>``, the summary at the end (orchestration/run_stream.py picks
  them out for the operator's console).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fedpanfm.config import config_from_run_config, load_config
from fedpanfm.run_folder import new_run_folder, record_environment
from fedpanfm.run_log import run_log_file

#: How our records look in the deployed ServerApp's output (orchestration/run_stream.py reads it).
STREAM_FORMAT = "%(levelname)s %(name)s: %(message)s"
#: The loggers whose records go to the ServerApp's stderr (Flower's has its own handler; httpx
#: logs every request at INFO).
OURS = ("orchestration", "fedpanfm")


def run_folder_of(run_config: Mapping[str, Any]) -> tuple[Path, str]:
    """(the run folder a deployed run writes, the configured device).

    ``resume`` names the folder of a resumed run, else ``run-folder`` (``federation run`` always
    sets it), else a new ``<logging.run_dir>/<name>-federation-<time>`` (a plain ``flwr run``).

    Args:
        run_config: the Flower run config (``[tool.flwr.app.config]`` plus what was submitted).
    """
    if run_config.get("resume"):
        # The device is only a label here: the run itself continues with the checksummed config
        # of its checkpoint (orchestration/resume.py).
        folder = Path(str(run_config["resume"]))
        return folder, load_config(folder / "config.yaml").device
    cfg = config_from_run_config(run_config)
    named = str(run_config.get("run-folder") or "")
    return Path(named) if named else new_run_folder(cfg.logging.run_dir, cfg.name, "federation"), cfg.device


@contextlib.contextmanager
def stream_to_stderr(stream: Any = None) -> Iterator[logging.Handler]:
    """Within the block our loggers' records (INFO and up) are also written to ``stream``
    (default: ``sys.stderr`` as the block starts, which Flower mirrors into the run's log).

    Args:
        stream: where to write (a test passes a buffer).
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter(STREAM_FORMAT))
    before = {name: logging.getLogger(name).level for name in OURS}
    for name in OURS:
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        logger.addHandler(handler)
    try:
        yield handler
    finally:
        for name in OURS:
            logging.getLogger(name).removeHandler(handler)
            logging.getLogger(name).setLevel(before[name])
        handler.flush()


@contextlib.contextmanager
def deployed_run(run_config: Mapping[str, Any], run_id: int, stream: Any = None) -> Iterator[dict[str, Any]]:
    """Prepare a deployed run's folder and output (module docstring) for the block.

    Args:
        run_config: the run's Flower run config.
        run_id: Flower's run id (named in the environment entry).
        stream: where our records are written (default ``sys.stderr``).

    Yields:
        The run config with ``run-folder`` set to the folder prepared, for ``run_federation``.
    """
    folder, device = run_folder_of(run_config)
    with stream_to_stderr(stream), run_log_file(folder):
        record_environment(folder, device, f"flwr-serverapp: the ServerApp of Flower run {run_id}")
        yield {**run_config, "run-folder": str(folder)}


__all__ = ["OURS", "STREAM_FORMAT", "deployed_run", "run_folder_of", "stream_to_stderr"]

"""``python -m sites.worker --socket PATH --key PATH``: run a trainer worker in the foreground."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from sites.worker.server import TrainerWorker

log = logging.getLogger("sites.worker")


def _exit_with_parent(parent_pid: int) -> None:
    # The worker must not outlive `site start`, even when that is killed with SIGKILL.
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    log.warning("parent %d is gone: trainer worker exits", parent_pid)
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    """``python -m sites.worker --socket PATH --key PATH``: run a worker in the foreground."""
    ap = argparse.ArgumentParser(prog="python -m sites.worker", description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--socket", required=True, type=Path, help="Unix-domain socket to listen on")
    ap.add_argument("--key", required=True, type=Path, help="auth key file (mode 0600)")
    ap.add_argument("--parent-pid", type=int, default=0, help="exit when this process is gone (0: never)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    worker = TrainerWorker(args.socket, args.key)

    def on_term(*_: object) -> None:
        raise SystemExit(0)  # unwinds accept() / training; the listener's close removes the socket

    signal.signal(signal.SIGTERM, on_term)
    if args.parent_pid:
        threading.Thread(target=_exit_with_parent, args=(args.parent_pid,), daemon=True).start()
    # Import torch, DeepSpeed and the app now, not in the first round.
    import fedpanfm.train.engine  # noqa: F401
    import sites.handlers  # noqa: F401

    try:
        worker.serve()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Flower's and Ray's output into Python logging, so each line reaches ``run.log`` once.

Flower's logger has its own console handler and also propagates to the root logger: every
Flower line would print twice. Ray prints its workers' stdout/stderr (the sites' ClientApp
actors) straight to the driver's streams, past logging. While a federation runs in this
process, :func:`routed_logs` removes Flower's handler (its records still propagate to the root
handlers of ``fedpanfm/run_log.py``) and sends every Ray worker line to the ``ray.workers``
logger at INFO, prefixed with the actor and pid, as Ray would print it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

WORKERS = logging.getLogger("ray.workers")

#: Ray's name for the driver's printing handler (ray/_private/worker.py, ``ray.init``).
_RAY_PRINT = "ray_print_logs"
_OURS = "fedpanfm_log_workers"


def _log_worker_lines(data: dict[str, Any]) -> None:
    who = data.get("actor_name") or data.get("task_name") or ""
    prefix = f"({who} pid={data.get('pid')}) " if who else f"(pid={data.get('pid')}) "
    for line in data.get("lines", []):
        if line.strip():
            WORKERS.info("%s%s", prefix, line.rstrip())


@contextlib.contextmanager
def routed_logs() -> Iterator[None]:
    """Within the block: Flower without its own console handler, Ray workers' output as records.

    Call it after ``ray.init``. Where Ray's private dispatcher is not found (another Ray
    version), Ray keeps printing as before: the run still works, only less tidily.
    """
    from flwr.common.logger import FLOWER_LOGGER, console_handler

    had_flower = console_handler in FLOWER_LOGGER.handlers
    FLOWER_LOGGER.removeHandler(console_handler)
    dispatcher = _ray_dispatcher()
    ray_printing = None
    if dispatcher is not None:
        ray_printing = [h for h in dispatcher.handlers if h[0] == _RAY_PRINT]
        dispatcher.remove_handler(_RAY_PRINT)
        dispatcher.add_handler(_OURS, _log_worker_lines)
    try:
        yield
    finally:
        if dispatcher is not None:
            dispatcher.remove_handler(_OURS)
            for name, handler in ray_printing or []:
                dispatcher.add_handler(name, handler)
        if had_flower and console_handler not in FLOWER_LOGGER.handlers:
            FLOWER_LOGGER.addHandler(console_handler)


def _ray_dispatcher() -> Any:
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return None
    if not all(hasattr(dispatcher, a) for a in ("handlers", "add_handler", "remove_handler")):
        return None
    return dispatcher


__all__ = ["WORKERS", "routed_logs"]

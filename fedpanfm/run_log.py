"""Where log records go: ``<run>/run.log`` in full, the console only what a person acts on.

The ``fedpanfm`` command calls :func:`configure` once. Until a job knows its run folder,
records go to the console at INFO (``-v``: DEBUG); a job that writes a run folder calls
:func:`run_log_file`, after which every record (Flower's, Ray's, the libraries', ours) is
written once to ``run.log`` and the console keeps only warnings and errors, unless ``-v``.

Our design choices:

- One root handler per destination and no other: Flower's own console handler is removed
  while a federation runs in this process (``orchestration/log_routing.py``), so a Flower line
  is written once, not twice.
- :data:`NOISE` drops, from the console only, the messages a user can do nothing about (listed
  one by one, matched on logger and message, so nothing else is muted). ``run.log`` keeps them.
- The console handler looks ``sys.stderr`` up at every record: a live progress display
  (``fedpanfm/console.py``) redirects it, so log lines print above the bar instead of through it.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path

#: (logger name prefix, message regex) of records that never reach the console.
NOISE: tuple[tuple[str, re.Pattern[str]], ...] = (
    # SQLAlchemy's migration tool, imported by Flower, announces each plugin it loads.
    ("alembic.runtime.plugins", re.compile(r"^setup plugin ")),
    # Flower 1.41 warns that the in-process simulation entry point will go; we chose it on purpose
    # (orchestration/simulate.py explains why) and the user cannot change it.
    ("flwr", re.compile(r"DEPRECATED FEATURE: The `run_simulation` function is deprecated")),
    # Ray's advice about a future default for accelerator env vars, on every ray.init with no GPUs.
    ("py.warnings", re.compile(r"FutureWarning: Tip: In future versions of Ray, Ray will no longer override")),
)

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATEFMT = "%H:%M:%S"


class NoiseFilter(logging.Filter):
    """Drops the records listed in :data:`NOISE`."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        for prefix, pattern in NOISE:
            if (name == prefix or name.startswith(prefix + ".")) and pattern.search(record.getMessage()):
                return False
        return True


class ConsoleHandler(logging.StreamHandler):
    """A StreamHandler writing to whatever ``sys.stderr`` is when the record arrives."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # noqa: ANN201 - the stream of logging.StreamHandler
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:  # StreamHandler.__init__ assigns it; the property wins
        pass


class RunLogState:
    """The handlers :func:`configure` and :func:`run_log_file` installed (one per process)."""

    def __init__(self) -> None:
        self.console: ConsoleHandler | None = None
        self.files: list[logging.FileHandler] = []
        self.verbose = False

    def console_level(self) -> int:
        if self.verbose:
            return logging.DEBUG
        return logging.WARNING if self.files else logging.INFO


STATE = RunLogState()


def configure(verbose: bool = False) -> None:
    """Install the console handler on the root logger (idempotent).

    Args:
        verbose: DEBUG records on the console, and the console keeps everything while a run log
            is open.
    """
    root = logging.getLogger()
    STATE.verbose = verbose
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if STATE.console is None:
        STATE.console = ConsoleHandler()
        STATE.console.setFormatter(logging.Formatter(FORMAT, DATEFMT))
        STATE.console.addFilter(NoiseFilter())
        root.addHandler(STATE.console)
    STATE.console.setLevel(STATE.console_level())
    # Python warnings become records of the "py.warnings" logger: written once to run.log, and
    # filtered like any other record instead of printed raw to stderr.
    logging.captureWarnings(True)


@contextlib.contextmanager
def run_log_file(folder: Path) -> Iterator[Path]:
    """Within the block every record also goes to ``folder/run.log`` (appended: a resumed run
    continues its log), and the console keeps warnings and errors only, unless verbose.

    A block inside a block for the same folder adds nothing (each line is written once).

    Yields:
        The log file's path.
    """
    path = (Path(folder) / "run.log").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    if any(Path(h.baseFilename) == path for h in STATE.files):
        yield path
        return
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d " + FORMAT[len("%(asctime)s "):], DATEFMT))
    root = logging.getLogger()
    level = root.level
    root.setLevel(min(level, logging.INFO))  # a caller that never ran configure() still gets INFO
    root.addHandler(handler)
    STATE.files.append(handler)
    if STATE.console is not None:
        STATE.console.setLevel(STATE.console_level())
    try:
        yield path
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        STATE.files.remove(handler)
        handler.close()
        if STATE.console is not None:
            STATE.console.setLevel(STATE.console_level())


__all__ = ["NOISE", "NoiseFilter", "configure", "run_log_file"]

"""The console of a federated run: a progress bar over rounds with ETA, and one line per round.

The ServerApp reports each round as a record of the :data:`ROUNDS` logger carrying a
:class:`RoundStatus` (``extra={"round_status": ...}``), and the run's plan as one record
carrying ``round_plan = (rounds already done, last round)``. Wherever the ServerApp runs, the
line is therefore in the log (``run.log``; ``flwr run --stream`` in a deployment). Where a person
watches the run in this process (``fedpanfm simulate``), :func:`live_rounds` adds the
:class:`RoundConsole` handler, which draws the bar (rich) and prints each line above it.

The line, in the order people read it: round, train and validation loss, probe AUROC with its
change since round 0 (the progress signal; the SSL losses are secondary), the normalised
entropy of the global organ attention (1 = every organ equally salient), sites that
contributed / failed, the round's wall time and the bytes it moved.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, TypeGuard

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

#: The logger the ServerApp writes round records to.
ROUNDS = logging.getLogger("fedpanfm.rounds")


@dataclass(frozen=True)
class RoundStatus:
    """One round, as the console line shows it (None: not measured this round).

    Args:
        round: the round, from 1 (0: the initial weights, probed before training).
        last: the run's last round.
        train_loss: subject-weighted mean of the sites' training loss.
        val_loss: subject-weighted mean of the sites' validation loss.
        auroc: the server probe's macro AUROC of the round's global teacher.
        auroc_round0: the same for the initial weights (the change is shown against it).
        entropy: normalised entropy of the global organ saliency, in [0, 1].
        sites_ok: sites whose update was aggregated.
        sites_failed: sites that were sent the round and contributed nothing.
        seconds: the round's wall time.
        bytes: array bytes sent and received this round.
    """

    round: int
    last: int
    train_loss: float | None = None
    val_loss: float | None = None
    auroc: float | None = None
    auroc_round0: float | None = None
    entropy: float | None = None
    sites_ok: int = 0
    sites_failed: int = 0
    seconds: float | None = None
    bytes: float | None = None

    def line(self) -> str:
        """The one-line view, e.g. ``round 2/3  train 6.879  val 3.422  AUROC 0.612 (+0.031)  ...``."""
        width = len(str(self.last))
        head = f"round {self.round:>{width}}/{self.last}"
        if self.round == 0:
            return f"{head}  initial weights  AUROC {_num(self.auroc, 3)}"
        parts = [head, f"train {_num(self.train_loss, 3)}", f"val {_num(self.val_loss, 3)}"]
        if self.auroc is not None or self.auroc_round0 is not None:
            delta = (f" ({self.auroc - self.auroc_round0:+.3f})"
                     if _finite(self.auroc) and _finite(self.auroc_round0) else "")
            parts.append(f"AUROC {_num(self.auroc, 3)}{delta}")
        parts.append(f"entropy {_num(self.entropy, 2)}")
        parts.append(f"sites {self.sites_ok} ok" + (f" / {self.sites_failed} failed" if self.sites_failed else ""))
        parts.append(f"{_num(self.seconds, 1)} s")
        parts.append(human_bytes(self.bytes))
        return "  ".join(parts)


def _finite(v: float | None) -> TypeGuard[float]:
    return v is not None and math.isfinite(v)


def _num(v: float | None, digits: int) -> str:
    return f"{v:.{digits}f}" if _finite(v) else "-"


def human_bytes(n: float | None) -> str:
    """``1.1 MB`` style (powers of 1000, as network traffic is counted); ``-`` when unknown."""
    if not _finite(n):
        return "- B"
    assert n is not None
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


class RoundConsole(logging.Handler):
    """Draws the rounds' progress bar and prints each round's line above it.

    Args:
        file: where to draw (default: ``sys.stdout`` at construction). Off a terminal the bar is
            printed once, at the end, so a captured log holds no redraws.
    """

    def __init__(self, file: IO[str] | None = None) -> None:
        super().__init__(logging.INFO)
        self._file = file if file is not None else sys.stdout
        self._progress: Progress | None = None  # once the plan is known
        self._task: TaskID | None = None
        self._lock_bar = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            plan = getattr(record, "round_plan", None)
            status = getattr(record, "round_status", None)
            with self._lock_bar:
                if plan is not None:
                    self._start(*plan)
                elif isinstance(status, RoundStatus):
                    progress, task = self._progress, self._task
                    if progress is None or task is None:
                        progress, task = self._start(max(0, status.round - 1), status.last)
                    progress.console.print(status.line(), highlight=False, markup=False, soft_wrap=True)
                    if status.round > 0:
                        progress.update(task, completed=status.round)
        except Exception:  # noqa: BLE001 - a display problem must never stop the run
            self.handleError(record)

    def _start(self, done: int, last: int) -> tuple[Progress, TaskID]:
        """The bar and its task, started at ``done`` of ``last`` rounds unless already running."""
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        if self._progress is not None and self._task is not None:
            return self._progress, self._task
        progress = Progress(
            TextColumn("rounds"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(),
            TextColumn("ETA"), TimeRemainingColumn(),
            console=Console(file=self._file, highlight=False), transient=False,
        )
        self._progress, self._task = progress, progress.add_task("rounds", total=max(1, last), completed=done)
        progress.start()
        return progress, self._task

    def close(self) -> None:
        with self._lock_bar:
            if self._progress is not None:
                self._progress.stop()
                self._progress = None
        super().close()


class _NotRoundRecords(logging.Filter):
    """For the plain console while :class:`RoundConsole` shows the rounds: no second copy."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (hasattr(record, "round_status") or hasattr(record, "round_plan"))


@contextlib.contextmanager
def live_rounds(file: IO[str] | None = None) -> Iterator[RoundConsole]:
    """Within the block, round records of :data:`ROUNDS` draw the progress bar and lines."""
    from fedpanfm.run_log import STATE

    handler = RoundConsole(file)
    quiet = _NotRoundRecords()
    ROUNDS.addHandler(handler)
    if ROUNDS.level == logging.NOTSET or ROUNDS.level > logging.INFO:
        ROUNDS.setLevel(logging.INFO)
    if STATE.console is not None:
        STATE.console.addFilter(quiet)
    try:
        yield handler
    finally:
        ROUNDS.removeHandler(handler)
        handler.close()
        if STATE.console is not None:
            STATE.console.removeFilter(quiet)


__all__ = ["ROUNDS", "RoundConsole", "RoundStatus", "human_bytes", "live_rounds"]

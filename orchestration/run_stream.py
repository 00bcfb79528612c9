"""What ``fedpanfm federation run`` shows of a deployed run's log stream (``flwr run --stream``).

The stream is the ServerApp process's whole output: Flower's log (a dump of every aggregated
MetricRecord each round, the final results), Ray's, Python warnings and our records
(orchestration/deployed_run.py). ``federation run`` keeps all of it in
``<run folder>/federation_run.log`` and shows the operator what ``fedpanfm simulate`` shows:

- fedpanfm's run plan and per-round lines, as the bare line (``round 2/3  train 5.046 ...``);
- warnings and errors, whoever logs them (Flower, Ray, Python warnings, ours), except those
  ``fedpanfm.run_log.NOISE`` lists as noise a user cannot act on;
- lines it does not recognise (the Flower CLI's own, e.g. ``Successfully started run <id>``);
- a line starting with white space continues the line before it and is shown or hidden with it.

Hidden: Flower's, Ray's and our INFO records, fedpanfm's summary among them (``federation run``
prints it from ``summary.json`` at the end, with the resume command filled in). ``-v`` shows
every line.
"""

from __future__ import annotations

import logging
import re

from fedpanfm.console import ROUNDS
from fedpanfm.run_log import NOISE

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LEVEL = r"(DEBUG|INFO|WARNING|ERROR|CRITICAL)"
#: Our records (orchestration/deployed_run.py STREAM_FORMAT): ``INFO fedpanfm.rounds: <message>``.
_OURS = re.compile(_LEVEL + r" ((?:fedpanfm|orchestration|sites)(?:\.\w+)*): (.*)")
#: Flower's console handler: ``INFO :      <message>`` (coloured in the stream).
_FLOWER = re.compile(_LEVEL + r"\s*:\s")
#: Ray's driver log: ``2026-11-30 23:21:08,244<TAB>INFO worker.py:2012 -- <message>``.
_RAY = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+" + _LEVEL + r"\s")


class StreamView:
    """Decides line by line what the operator's console shows (module docstring)."""

    def __init__(self) -> None:
        self._shown = True  # the decision a continuation line inherits

    def __call__(self, line: str) -> str | None:
        """The text to print for ``line`` (a line of the stream, newline included), or None."""
        plain = _ANSI.sub("", line).rstrip("\n")
        if not plain.strip() or plain[0] in " \t":
            return line if self._shown else None
        text, self._shown = self._decide(plain, line)
        return text if self._shown else None

    @staticmethod
    def _decide(plain: str, line: str) -> tuple[str, bool]:
        ours = _OURS.fullmatch(plain)
        if ours is not None:
            level, name, message = ours.groups()
            if name == ROUNDS.name and level == "INFO":
                return message + "\n", True
            return line, _serious(level)
        known = _FLOWER.match(plain) or _RAY.match(plain)
        if known is not None:
            return line, _serious(known.group(1)) and not _noise(plain)
        return line, not _noise(plain)


def _serious(level: str) -> bool:
    return logging.getLevelName(level) >= logging.WARNING


def _noise(plain: str) -> bool:
    return any(pattern.search(plain) for _, pattern in NOISE)


__all__ = ["StreamView"]

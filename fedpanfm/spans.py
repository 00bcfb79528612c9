"""Where a call's time goes: consecutive wall-clock spans, reported as metrics.

One timer serves the site's training call (``sites/client_app.py``) and the server's round
(``orchestration/strategy.py``, ``orchestration/server_app.py``), so every ``time/..._s`` tag
of docs/performance.md, item 4, is measured the same way.
"""

from __future__ import annotations

import time


class SpanTimer:
    """Consecutive wall-clock spans of one call: ``mark(name)`` closes the span since the last
    mark (or creation) under ``name``."""

    def __init__(self) -> None:
        self._start = self._last = time.perf_counter()
        self._spans: dict[str, float] = {}

    def mark(self, name: str) -> None:
        """Close the running span as ``name`` (seconds added if the name repeats)."""
        now = time.perf_counter()
        self._spans[name] = self._spans.get(name, 0.0) + now - self._last
        self._last = now

    def seconds(self) -> dict[str, float]:
        """Span name -> seconds, in the order first marked."""
        return dict(self._spans)

    def tagged(self, prefix: str) -> dict[str, float]:
        """The spans as metric tags ``<prefix><name>_s`` -> seconds."""
        return {f"{prefix}{name}_s": sec for name, sec in self._spans.items()}

    def elapsed(self) -> float:
        """Seconds since the timer was created."""
        return time.perf_counter() - self._start


__all__ = ["SpanTimer"]

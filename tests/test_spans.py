"""SpanTimer: consecutive spans, repeated names add up, tags and elapsed time agree."""

from __future__ import annotations

import time

from fedpanfm.spans import SpanTimer


def test_spans_are_consecutive_and_tagged() -> None:
    spans = SpanTimer()
    time.sleep(0.02)
    spans.mark("a")
    time.sleep(0.01)
    spans.mark("b")
    time.sleep(0.01)
    spans.mark("a")  # a repeated name adds to its span
    sec = spans.seconds()
    assert list(sec) == ["a", "b"]
    assert sec["a"] >= 0.03 and 0.01 <= sec["b"] < sec["a"]
    assert spans.tagged("time/server/") == {"time/server/a_s": sec["a"], "time/server/b_s": sec["b"]}
    # The spans tile the time since creation: nothing between two marks is lost.
    total = spans.elapsed()
    assert sum(sec.values()) <= total < sum(sec.values()) + 0.01

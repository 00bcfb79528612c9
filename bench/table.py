"""One line of the benchmark table, and the table printed / written as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Row:
    """A measured ratio (or figure) and its target.

    Args:
        item: the issue's item number (1..7) and a short name, e.g. "1 deepspeed/plain".
        value: the measured ratio or figure.
        target: the target as text ("<= 1.05"), "" when the line is informative only.
        ok: whether the target is met (None: no target).
        detail: the two measured quantities the ratio divides, in words with units.
        data: the raw numbers (for the JSON).
    """

    item: str
    value: float
    target: str = ""
    ok: bool | None = None
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)


def check(value: float, op: str, bound: float) -> bool:
    """``value <= bound`` for op "<=", ``value >= bound`` for ">="."""
    if op not in ("<=", ">="):
        raise ValueError(f"check: unknown comparison {op!r}")
    return value <= bound if op == "<=" else value >= bound


def render(rows: list[Row]) -> str:
    """The rows as a fixed-width text table."""
    head = f"{'item':40s} {'value':>10s}  {'target':14s} {'met':4s} detail"
    lines = [head, "-" * len(head)]
    for r in rows:
        met = "" if r.ok is None else ("yes" if r.ok else "NO")
        lines.append(f"{r.item:40s} {r.value:10.3f}  {r.target:14s} {met:4s} {r.detail}")
    return "\n".join(lines)


def markdown(rows: list[Row]) -> str:
    """The rows as a Markdown table (docs/performance.md)."""
    out = ["| item | value | target | met | detail |", "|---|---:|---|---|---|"]
    for r in rows:
        met = "" if r.ok is None else ("yes" if r.ok else "**no**")
        out.append(f"| {r.item} | {r.value:.3f} | {r.target} | {met} | {r.detail} |")
    return "\n".join(out)


def write_json(rows: list[Row], path: Path, meta: dict[str, Any]) -> None:
    """``{"meta": ..., "rows": [...]}`` to ``path`` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))

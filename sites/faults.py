"""Test-only fault injection for sites, switched on by the ``FEDPANFM_FAULT`` environment variable.

``FEDPANFM_FAULT="SITE:KIND:roundR[:SECONDS][,...]"``, KIND one of:

- ``raise``: the site's train call raises (Flower turns it into an error reply);
- ``hang``: it sleeps SECONDS (default 3600) before training, past ``round_timeout_s``;
- ``vanish``: the site's process exits at once (``os._exit``), as a machine that disappears.

Unset (production), :func:`apply_fault` returns at once; a malformed value is an error naming
the item, so a typo never silently disables an intended fault.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

ENV = "FEDPANFM_FAULT"
KINDS = ("raise", "hang", "vanish")


class InjectedFault(RuntimeError):
    """The failure a ``raise`` fault produces."""


@dataclass(frozen=True)
class Fault:
    site: str
    kind: str
    round: int
    seconds: float = 3600.0


def parse_faults(spec: str) -> list[Fault]:
    """The faults of a ``FEDPANFM_FAULT`` value ("" = none).

    Args:
        spec: comma-separated ``SITE:KIND:roundR[:SECONDS]`` items.
    """
    out: list[Fault] = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        parts = item.split(":")
        if len(parts) not in (3, 4) or parts[1] not in KINDS or not parts[2].startswith("round") \
                or not parts[2][5:].isdigit():
            raise ValueError(f"{ENV}: item {item!r} is not SITE:{'|'.join(KINDS)}:roundR[:SECONDS]")
        try:
            seconds = float(parts[3]) if len(parts) == 4 else 3600.0
        except ValueError:
            raise ValueError(f"{ENV}: item {item!r}: SECONDS {parts[3]!r} is not a number") from None
        out.append(Fault(parts[0], parts[1], int(parts[2][5:]), seconds))
    return out


def apply_fault(site: str, server_round: int) -> None:
    """Inject the fault ``FEDPANFM_FAULT`` names for this site and round, if any.

    Args:
        site: the site's name.
        server_round: the round being trained.
    """
    for f in parse_faults(os.environ.get(ENV, "")):
        if f.site != site or f.round != server_round:
            continue
        if f.kind == "raise":
            raise InjectedFault(f"site {site}: injected failure in round {server_round} ({ENV})")
        if f.kind == "hang":
            time.sleep(f.seconds)
        if f.kind == "vanish":
            os._exit(17)


__all__ = ["ENV", "Fault", "InjectedFault", "apply_fault", "parse_faults"]

"""Each round's console line, assembled from the recorder's scalars and the probe's AUROC.

The server probe scores a round's global teacher on its own thread, after the round's other
figures are known. :class:`RoundLines` holds a round's :class:`~fedpanfm.console.RoundStatus`
until that round's probe result arrives (or the probe reports it skipped or failed), then
writes it as a record of :data:`fedpanfm.console.ROUNDS`; lines go out in round order because
the probe works through rounds in order. Without a probe a line goes out at once.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Mapping

import torch

from fedpanfm.console import ROUNDS, RoundStatus
from fedpanfm.evaluation.attention import normalised_entropy
from orchestration.strategy import RoundReport

#: The probe value the line shows.
AUROC = "probe/auroc_macro"


def saliency_entropy(metrics: Mapping[str, float], organs: tuple[str, ...]) -> float | None:
    """Normalised entropy of the global organ saliency (``saliency/<organ>`` shares); None if absent."""
    shares = [metrics.get(f"saliency/{o}") for o in organs]
    if any(v is None for v in shares):
        return None
    p = torch.tensor([shares], dtype=torch.float64)
    value = float(normalised_entropy(p, torch.ones_like(p, dtype=torch.bool))[0])
    return value if math.isfinite(value) else None


def round_status(server_round: int, last: int, scalars: Mapping[str, float], report: RoundReport | None,
                 organs: tuple[str, ...], round_bytes: float) -> RoundStatus:
    """The line's figures for one round (the AUROC is filled in by :class:`RoundLines`).

    Args:
        server_round: the round.
        last: the run's last round.
        scalars: the server's scalars of the round (``train/loss``, ``val/loss``,
            ``time/round_s``, ``saliency/<organ>``).
        report: the strategy's report of the round (None: no aggregation this round).
        organs: the organ vocabulary.
        round_bytes: array bytes sent and received this round.
    """
    ok = set(report.site_metrics) if report is not None else set()
    failed = {s for s, n in (report.failures if report is not None else {}).items() if n and s not in ok}
    return RoundStatus(
        round=server_round, last=last, train_loss=scalars.get("train/loss"), val_loss=scalars.get("val/loss"),
        entropy=saliency_entropy(scalars, organs), sites_ok=len(ok), sites_failed=len(failed),
        seconds=scalars.get("time/round_s"), bytes=round_bytes,
    )


class RoundLines:
    """Pairs each round's status with its probe AUROC and writes the line once both are known.

    Args:
        last: the run's last round.
        probing: whether a server probe scores rounds (else lines go out at once).
    """

    def __init__(self, last: int, probing: bool) -> None:
        self.last = last
        self.probing = probing
        self.auroc: dict[int, float | None] = {}
        self._waiting: dict[int, RoundStatus] = {}
        self._lock = threading.Lock()

    @property
    def round0(self) -> float | None:
        """The AUROC of the initial weights (None: not probed or undefined)."""
        return self.auroc.get(0)

    def status(self, status: RoundStatus) -> None:
        """A round's figures are in; write its line now or when its AUROC arrives."""
        with self._lock:
            if not self.probing or status.round in self.auroc:
                self._emit(status)
            else:
                self._waiting[status.round] = status

    def probe_result(self, server_round: int, values: Mapping[str, float] | None) -> None:
        """The probe's callback (its thread): round -> its values, None when skipped or failed."""
        v = values.get(AUROC) if values is not None else None
        with self._lock:
            self.auroc[server_round] = float(v) if v is not None and math.isfinite(v) else None
            if server_round == 0:
                self._emit(RoundStatus(round=0, last=self.last))
            waiting = self._waiting.pop(server_round, None)
            if waiting is not None:
                self._emit(waiting)

    def flush(self) -> None:
        """Write the lines still waiting (the probe ended without scoring them)."""
        with self._lock:
            for r in sorted(self._waiting):
                self._emit(self._waiting.pop(r))

    def _emit(self, status: RoundStatus) -> None:
        status = dataclasses.replace(status, auroc=self.auroc.get(status.round),
                                     auroc_round0=self.auroc.get(0) if status.round else None)
        ROUNDS.info("%s", status.line(), extra={"round_status": status})


__all__ = ["AUROC", "RoundLines", "round_status", "saliency_entropy"]

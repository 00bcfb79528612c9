"""``summary.json`` of a federated run, built up as the run goes, and its text for a person.

The summary is what a run leaves for scripts (the study, the soak bench, ``federation run``):
cumulative site failures, why it stopped, the privacy spent, the rounds' losses, times and memory,
the best checkpoint and the server probe's AUROC.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestration.resume import resume_command

#: The validation tag a round's ``best`` checkpoint is chosen by (mean over sites by subjects).
VAL_LOSS = "val/loss"


class RunSummary:
    """The parts of ``summary.json`` that accumulate over the rounds.

    Args:
        folder: the run folder (``summary.json`` goes there).
        resumed_from: the round a resumed run continued after (None: a fresh run).
        history: the scalars of every round so far (a resumed run's from its checkpoint).
        failures: site -> failures so far (likewise).
        site_steps: site -> optimiser steps of its accepted updates so far (likewise).
    """

    def __init__(self, folder: Path, resumed_from: int | None = None, history: list[dict[str, float]] | None = None,
                 failures: Mapping[str, int] | None = None, site_steps: Mapping[str, int] | None = None) -> None:
        self.folder = Path(folder)
        self.resumed_from = resumed_from
        self.history: list[dict[str, float]] = list(history or [])
        self.failures: dict[str, int] = {str(k): int(v) for k, v in (failures or {}).items()}
        self.site_steps: dict[str, int] = {str(k): int(v) for k, v in (site_steps or {}).items()}
        #: Why the run stopped (an exception's text); None while it runs or after it finished.
        self.stopped: str | None = None
        #: Why the run ended before ``federation.rounds`` without failing (the privacy budget).
        self.budget_stop: str | None = None
        #: The command that continues this run (simulate or federation run --resume).
        self.resume_command = resume_command(self.folder)

    def count_steps(self, site_metrics: Mapping[str, Mapping[str, float]]) -> None:
        """Add a round's optimiser steps (each aggregated site's ``steps``) to the run's.

        What the study checks its budget against: the steps of the updates the federation used.
        """
        for site, values in site_metrics.items():
            self.site_steps[site] = self.site_steps.get(site, 0) + int(round(values.get("steps", 0.0)))

    def count_failures(self, failures: Mapping[str, int]) -> None:
        """Add a round's site failures (site -> count) to the run's."""
        for site, n in failures.items():
            self.failures[site] = self.failures.get(site, 0) + n

    def write(self, *, sites: list[str], tensorboard: Path, best_round: int | None, best_loss: float | None,
              dp_epsilon: float | None, dp_delta: float | None, dp_max_epsilon: float | None,
              probe_auroc: Mapping[int, float]) -> dict[str, Any]:
        """Build ``summary.json``, write it into the run folder and return it.

        Args:
            sites: the sites that reported.
            tensorboard: the run's TensorBoard folder.
            best_round: the round of the ``best`` checkpoint (None: none chosen).
            best_loss: its validation loss.
            dp_epsilon: the privacy spent (None: no DP, or no finite guarantee).
            dp_delta: the DP delta (None: no DP).
            dp_max_epsilon: the DP budget (None: none).
            probe_auroc: round -> the server probe's macro AUROC.
        """
        last = self.history[-1] if self.history else {}
        ck = self.folder / "checkpoints"
        summary = {
            "run_folder": str(self.folder),
            "stopped": self.stopped,
            "budget_stop": self.budget_stop,
            "resume_command": self.resume_command,
            "resumed_from_round": self.resumed_from,
            "failures": dict(sorted(self.failures.items())),
            "site_steps": dict(sorted(self.site_steps.items())),
            "dp_epsilon": dp_epsilon if dp_epsilon is None or math.isfinite(dp_epsilon) else None,
            "dp_delta": dp_delta,
            "dp_max_epsilon": dp_max_epsilon,
            "rss_mb_per_round": [h.get("memory/rss_mb") for h in self.history],
            "rounds": len(self.history),
            "sites": sorted(sites),
            "final_train_loss": last.get("train/loss"),
            "final_val_loss": last.get(VAL_LOSS),
            "best_round": best_round,
            "best_val_loss": best_loss if best_round else None,
            "tensorboard": str(tensorboard),
            "checkpoint_latest": str(ck / "latest"),
            "checkpoint_best": str(ck / "best") if best_round else None,
            "seconds_per_round": [h["time/round_s"] for h in self.history],
            "probe_auroc": {str(r): v for r, v in sorted(probe_auroc.items())},
        }
        (self.folder / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def summary_text(s: Mapping[str, Any]) -> str:
    """The run summary a person reads at the end of a federation."""
    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    stopped = [f"  STOPPED: {s['stopped']}\n  resume with: {s.get('resume_command') or resume_command(s['run_folder'])}"] \
        if s.get("stopped") else []
    failures = [f"  site failures: {', '.join(f'{k} {v}' for k, v in s['failures'].items())}"] if s.get("failures") else []
    privacy = [f"  differential privacy: epsilon {fmt(s['dp_epsilon'])} at delta {s['dp_delta']:g}"
               + (f" (budget {s['dp_max_epsilon']:g})" if s.get("dp_max_epsilon") else "")] \
        if s.get("dp_epsilon") is not None else []
    budget = [f"  ended early: {s['budget_stop']}"] if s.get("budget_stop") else []
    auroc = {int(r): v for r, v in (s.get("probe_auroc") or {}).items()}
    if auroc:
        r_last = max(auroc)
        change = f" ({auroc[r_last] - auroc[0]:+.3f} since round 0: {auroc[0]:.3f})" if 0 in auroc and r_last else ""
        probe = [f"  probe AUROC (server's held-out labelled cohort) {auroc[r_last]:.3f} at round {r_last}{change}"]
    else:
        probe = []
    return "\n".join([
        f"fedpanfm: {s['rounds']} rounds over sites {', '.join(s['sites'])}",
        *stopped, *budget, *failures, *privacy, *probe,
        f"  final train loss {fmt(s['final_train_loss'])}, final val loss {fmt(s['final_val_loss'])}, "
        f"best val loss {fmt(s['best_val_loss'])} (round {s['best_round']})",
        f"  TensorBoard: tensorboard --logdir {s['tensorboard']}",
        f"  checkpoints: {s['checkpoint_latest']} (latest), {s['checkpoint_best']} (best)",
    ])


__all__ = ["VAL_LOSS", "RunSummary", "summary_text"]

"""TensorBoard logging for runs, and reading the scalars back.

A run folder holds one sub-run per writer (``server``, ``site_<name>``, ``pretrain``), so
TensorBoard overlays sites and server in one view. Tags are ``group/name`` paths, e.g.
``loss/dino``, ``saliency/heart``, ``mask_rate/heart``, ``expert_usage/layer0/e1``,
``schedule/lr``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary

_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


class RunLogger:
    """Scalars of one sub-run, written under ``run_dir/name``.

    Args:
        run_dir: the experiment run folder.
        name: the sub-run, e.g. ``"server"``, ``"site_a"`` or ``"pretrain"`` (letters, digits,
            ``_ . -``).
        purge_step: when resuming a run, the first step to write again: events an interrupted
            run wrote at this step or later are hidden by TensorBoard (None: a fresh run).
    """

    def __init__(self, run_dir: Path, name: str, purge_step: int | None = None) -> None:
        if not _NAME.match(name):
            raise ValueError(f"TensorBoard run name {name!r}: use letters, digits, '_', '.', '-'")
        self.log_dir = Path(run_dir) / name
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)
        self._hparams_done = False

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Log ``tag -> value`` at ``step``; a non-finite value is an error naming its tag.

        Args:
            values: tag -> number (anything ``float()`` accepts, e.g. a 0-d tensor).
            step: the global step (or round / epoch) on the x axis.
        """
        for tag, value in values.items():
            v = float(value)
            if not math.isfinite(v):
                raise ValueError(f"TensorBoard {self.log_dir}: tag {tag!r} at step {step} is {v}")
            self._writer.add_scalar(tag, v, global_step=step)

    def hparams(self, params: dict[str, Any], metrics: dict[str, float]) -> None:
        """Record the run's hyper-parameters once (HPARAMS tab), with their final ``metrics``.

        Args:
            params: flat name -> bool / int / float / str (other values are logged as strings).
            metrics: tag -> final value; also written as ordinary scalars at step 0.
        """
        if self._hparams_done:
            raise RuntimeError(f"TensorBoard {self.log_dir}: hparams() was already called for this run")
        clean = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in params.items()}
        # Written into this run's own event file (SummaryWriter.add_hparams would open a second,
        # time-stamped sub-run and split the run in two in the TensorBoard UI).
        fw = self._writer._get_file_writer()
        for summary in hparams_summary(clean, {k: float(v) for k, v in metrics.items()}):
            fw.add_summary(summary)
        self.scalars(metrics, step=0)
        self._hparams_done = True

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def site_run_name(site: str) -> str:
    """The TensorBoard sub-run of a site: ``site_<name>``, without doubling a ``site_`` prefix."""
    return site if site.startswith("site_") else f"site_{site}"


def read_scalars(event_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """All scalars in one sub-run folder, via TensorBoard's own EventAccumulator.

    Args:
        event_dir: a folder holding ``events.out.tfevents.*`` files (e.g. ``run_dir/pretrain``).

    Returns:
        tag -> [(step, value), ...] in the order written.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_dir = Path(event_dir)
    if not event_dir.is_dir() or not any(event_dir.glob("events.out.tfevents.*")):
        raise FileNotFoundError(f"{event_dir}: no TensorBoard event files")
    acc = EventAccumulator(str(event_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, float(e.value)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


__all__ = ["RunLogger", "read_scalars"]

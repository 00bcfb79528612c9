"""TensorBoard logging for runs, and reading it back.

A run folder holds one sub-run per writer (``server``, ``site_<name>``, ``pretrain``), so
TensorBoard overlays sites and server in one view. Tags are ``group/name`` paths, e.g.
``loss/dino``, ``saliency/heart``, ``mask_rate/heart``, ``expert_usage/layer0/e1``,
``schedule/lr``.

Our choice: the science comes first and the machinery apart. Every scalar whose path names
time, bytes, memory or attempts (``time/round_s``, ``train/time/fit_s``, ``bytes/received``,
``memory/rss_mb``) is written under ``system/`` (:func:`grouped_tag`), so the Scalars tab shows
losses, probe AUROC, saliency and experts in their own groups and the run's cost in one
``system`` group; the custom-scalars layout (:func:`federation_layout`) lists the science
charts first, each overlaying the server and every site, then each site's per-step curves
(``site_<name>/steps``, written by ``sites/step_curves.py``) overlaid on the global step.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary

_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")

#: Path segments that make a scalar a cost of the run rather than a result (see module doc).
SYSTEM_SEGMENTS = frozenset({"time", "seconds", "bytes", "memory", "attempts"})
SYSTEM = "system/"


def grouped_tag(tag: str) -> str:
    """``tag`` under ``system/`` when one of its path segments is in :data:`SYSTEM_SEGMENTS`."""
    if tag.startswith(SYSTEM) or not SYSTEM_SEGMENTS.intersection(tag.split("/")):
        return tag
    return SYSTEM + tag


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
        # fullmatch: ``$`` alone would accept a trailing newline; ".." would leave run_dir.
        if not _NAME.fullmatch(name) or name in (".", ".."):
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
            self._writer.add_scalar(grouped_tag(tag), v, global_step=step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """An (H, W, 3) uint8 picture (``fedpanfm/tb_figures.py``) at ``step``."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"TensorBoard {self.log_dir}: image {tag!r} must be (H, W, 3) uint8, "
                             f"got {image.shape} {image.dtype}")
        self._writer.add_image(tag, image, global_step=step, dataformats="HWC")

    def text(self, tag: str, markdown: str, step: int) -> None:
        """Text at ``step`` (TensorBoard's TEXT tab renders markdown, tables included)."""
        self._writer.add_text(tag, markdown, global_step=step)

    def histogram(self, tag: str, values: Sequence[float] | np.ndarray, step: int) -> None:
        """The distribution of ``values`` (finite, at least one) at ``step``."""
        a = np.asarray(values, dtype=np.float64)
        if a.size == 0 or not np.isfinite(a).all():
            raise ValueError(f"TensorBoard {self.log_dir}: histogram {tag!r} at step {step} needs finite values")
        self._writer.add_histogram(grouped_tag(tag), a, global_step=step)

    def layout(self, layout: dict[str, dict[str, list[Any]]]) -> None:
        """The custom-scalars dashboard: category -> chart -> ``["Multiline", [tag regexes]]``."""
        self._writer.add_custom_scalars(layout)

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


def federation_layout(organs: Sequence[str]) -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout of a federated run: the science first, then ``system``.

    Multiline charts match their tag regexes in every sub-run, so each chart overlays the
    server's value with every site's. The per-step charts match the tags only a site's
    ``steps`` sub-run writes (the trainer's step metrics: ``loss/total``, ``loss/dino``,
    ``schedule/lr`` ...; the per-round runs write ``train/...``), so they overlay the sites'
    per-step curves on the federation's global step.
    """
    return {
        "1 progress": {
            "probe AUROC (server, held-out labelled cohort)": ["Multiline", [r"^probe/auroc_macro$"]],
            "train loss (server mean and each site)": ["Multiline", [r"^train/loss$"]],
            "validation loss (server mean and each site)": ["Multiline", [r"^val/loss$"]],
        },
        "2 losses": {
            "train loss terms": ["Multiline", [r"^train/loss/"]],
            "validation loss terms": ["Multiline", [r"^val/loss/"]],
        },
        "3 per step (each site, global step)": {
            "loss per step": ["Multiline", [r"^loss/total$"]],
            "loss terms per step": ["Multiline", [r"^loss/(?!total$)"]],
            "learning rate per step": ["Multiline", [r"^schedule/lr$"]],
            "teacher momentum and temperature per step": ["Multiline", [r"^schedule/teacher_"]],
            "masking per step": ["Multiline", [r"^mask/"]],
        },
        "4 organs": {
            **{f"saliency and mask rate: {o}": ["Multiline", [rf"^saliency/{o}$", rf"^train/mask_rate/{o}$"]]
               for o in organs},
        },
        "5 experts": {
            "expert usage": ["Multiline", [r"^expert_usage/"]],
            "director-expert divergence": ["Multiline", [r"^director_divergence/"]],
        },
        "6 system": {
            "round time (s)": ["Multiline", [r"^system/time/round_s$"]],
            "site time per call (s)": ["Multiline", [r"^system/train/time/"]],
            "bytes": ["Multiline", [r"^system/bytes/"]],
            "server memory (MiB)": ["Multiline", [r"^system/memory/"]],
        },
    }


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


def read_tags(event_dir: Path) -> dict[str, list[str]]:
    """Tag names by kind (``scalars``, ``images``, ``histograms``, ``tensors``) of one sub-run,
    via TensorBoard's EventAccumulator (hparams and the custom-scalars layout are tensors)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return {k: list(v) for k, v in acc.Tags().items() if isinstance(v, list)}


__all__ = ["RunLogger", "federation_layout", "grouped_tag", "read_scalars", "read_tags"]

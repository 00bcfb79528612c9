"""The federation's checkpoint policy: the global model every round, plus ``best`` and ``latest``.

Layout under a run's ``checkpoints/`` folder::

    round_<k>/     one checkpoint per round (fedpanfm/checkpoint.py format)
    best  -> round_<k>   the round with the lowest validation SSL loss so far
    latest -> round_<k>  the last round written

``best`` and ``latest`` are relative symbolic links, swapped atomically (``os.replace``), so a
reader never sees a half-written checkpoint through them and no weights are stored twice.

Writing runs on a thread of its own, beside the rest of the round's bookkeeping (TensorBoard,
the probe). Our design: one writer thread rather than concurrent Ray tasks: a single writer
keeps the writes in round order, so ``latest`` and ``best`` only move forward, and the weights
are not copied through Ray's object store once more. The round's write must have succeeded
before the next round starts (:meth:`CheckpointPolicy.wait_round`): a write that fails (disk
full, permissions) stops the run at that round with :class:`CheckpointWriteFailed`, naming the
last complete checkpoint (left as it was) and how to resume, instead of training on unsaved.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from fedpanfm.checkpoint import point_latest, save_checkpoint
from fedpanfm.config import ExperimentConfig

log = logging.getLogger(__name__)


class CheckpointWriteFailed(RuntimeError):
    """A round's checkpoint could not be written; the run stops at that round."""


class CheckpointPolicy:
    """Writes the global model after each round (in the background) and keeps ``best``/``latest``.

    Args:
        ckpt_dir: the run's ``checkpoints`` folder (created).
        cfg: the experiment config, stored with every checkpoint.
    """

    def __init__(self, ckpt_dir: Path, cfg: ExperimentConfig) -> None:
        self.dir = Path(ckpt_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.best_loss = math.inf
        self.best_round: int | None = None
        self.latest_round: int | None = None
        #: the last round whose checkpoint is complete on disk.
        self.last_written: int | None = None
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending: dict[int, Future[Path]] = {}

    def submit(self, server_round: int, state: dict[str, torch.Tensor], val_loss: float | None,
               meta: dict[str, Any]) -> Future[Path]:
        """Queue the checkpoint of ``server_round``; returns at once.

        Args:
            server_round: the round just finished (1-based).
            state: the global state dict after it (its tensors must not be changed later:
                pass a snapshot).
            val_loss: the validation SSL loss of these weights (mean over sites), or None when
                no site evaluated; the lowest so far becomes ``best``.
            meta: extra JSON-able facts stored in ``meta.json`` (losses, sites ...).
        """
        is_best = val_loss is not None and math.isfinite(val_loss) and val_loss < self.best_loss
        if is_best and val_loss is not None:
            self.best_loss, self.best_round = float(val_loss), server_round
        self.latest_round = server_round
        meta = {**meta, "round": server_round, "val_loss": val_loss, "best": is_best}
        fut = self._writer.submit(self._write, server_round, state, meta, is_best)
        self._pending[server_round] = fut
        return fut

    def restore(self, latest_round: int, best_round: int | None, best_loss: float | None) -> None:
        """Continue a resumed run: the best-so-far and last round it had written.

        Args:
            latest_round: the round the run resumes after.
            best_round: the round ``best`` points at (None: none yet).
            best_loss: its validation loss.
        """
        self.latest_round = self.last_written = latest_round
        self.best_round = best_round
        self.best_loss = float(best_loss) if best_round is not None and best_loss is not None else math.inf

    def _write(self, server_round: int, state: dict[str, torch.Tensor], meta: dict[str, Any],
               is_best: bool) -> Path:
        name = f"round_{server_round}"
        path = save_checkpoint(self.dir / name, state, self.cfg, meta)
        point_latest(self.dir / "latest", path)
        if is_best:
            point_latest(self.dir / "best", path)
        self.last_written = server_round
        log.info("checkpoint round %d written to %s%s", server_round, path, " (best)" if is_best else "")
        return path

    def _failed(self, server_round: int, exc: BaseException, resume_hint: str) -> CheckpointWriteFailed:
        last = (f"the last complete checkpoint is {self.dir / f'round_{self.last_written}'} (round "
                f"{self.last_written}; `latest` still points at it)" if self.last_written is not None
                else "no round's checkpoint is complete yet")
        hint = f"; free space or fix {self.dir}, then resume with: {resume_hint}" if resume_hint else ""
        return CheckpointWriteFailed(f"checkpoint of round {server_round} could not be written to "
                                     f"{self.dir / f'round_{server_round}'} ({type(exc).__name__}: {exc}); the run "
                                     f"stops after round {server_round}: {last}{hint}")

    def wait_round(self, server_round: int, resume_hint: str = "") -> Path:
        """Block until the checkpoint of ``server_round`` is on disk.

        Args:
            server_round: a round passed to :meth:`submit`.
            resume_hint: the command that continues the run, for the error message.

        Raises:
            CheckpointWriteFailed: the write failed; the previous checkpoint is untouched.
        """
        fut = self._pending.pop(server_round)
        try:
            return fut.result()
        except Exception as exc:
            raise self._failed(server_round, exc, resume_hint) from exc

    def wait(self) -> list[Path]:
        """Block until every queued write is done; raises :class:`CheckpointWriteFailed` for the
        first that failed (a failure already raised by :meth:`wait_round` is not raised again)."""
        pending, self._pending = self._pending, {}
        done, failure = [], None
        for k, fut in sorted(pending.items()):
            try:
                done.append(fut.result())
            except Exception as exc:
                failure = failure or (k, exc)
        if failure is not None:
            raise self._failed(failure[0], failure[1], "") from failure[1]
        return done

    def close(self) -> None:
        """Finish the queued writes and stop the writer thread."""
        try:
            self.wait()
        finally:
            self._writer.shutdown(wait=True)

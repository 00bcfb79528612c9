"""Server-side evaluation hook: probe AUROC of each round's global teacher, without blocking rounds.

The server holds a labelled validation cohort (``evaluation.server_cohort``; "" = off) that no
site trains on. After each round the ServerApp hands the global state to
:meth:`ServerProbe.submit`, which copies the teacher encoder's weights and returns at once; a
single background thread rebuilds the encoder, runs
:func:`fedpanfm.evaluation.probe.probe_auroc` (same subject split every round) and logs
``probe/auroc_macro``, ``probe/auroc/<label>``, ``probe/labels_scored``, ``probe/n_test`` and
``probe/seconds`` to the server's TensorBoard at the round's step.

Our design choices:

- A thread in the server process, not a Ray task: the
  results go to the server's own TensorBoard writer, which lives in this process, and the cohort
  is collated once and kept here rather than shipped to a worker every round.
- If rounds finish faster than the probe, the newest round wins: a round still *waiting* when a
  newer one arrives is skipped (``skipped``, with a warning), so the backlog never grows and the
  latest model is always the next one scored. ``evaluation.server_probe_every_round`` queues
  every round instead (small runs such as the quickstart, where the AUROC of each round is the
  progress signal on the console).
- ``on_result(round, values or None)`` is called on the probe thread once per submitted round, in
  round order (None: skipped or failed), so the caller can finish that round's console line.
- A failed evaluation does not stop training: it is logged at once and raised by :meth:`close`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fedpanfm.config import ExperimentConfig
from fedpanfm.data.batch import SubjectBatch
from fedpanfm.data.dataset import list_sites, pooled_dataset
from fedpanfm.evaluation.embed import collate_dataset
from fedpanfm.evaluation.probe import probe_auroc
from fedpanfm.model.encoder import PanOrganEncoder
from fedpanfm.tb import RunLogger

log = logging.getLogger(__name__)

#: Global-state keys of the encoder the probe scores (the EMA teacher, architecture.md).
TEACHER_PREFIX = "teacher.encoder."


class ServerProbe:
    """Per-round probe AUROC of the global teacher encoder on a held-out labelled cohort.

    Args:
        cfg: the experiment config (architecture, ``data`` preprocessing, ``evaluation`` probe
            settings).
        logger: the server's TensorBoard sub-run; scalars are written at step = round.
        cohort: the labelled cohort folder (site folders below it); None = ``evaluation.server_cohort``.
        seed: the probe split seed (the same every round); None = ``cfg.seed``.
        on_result: called with (round, the values logged) after each probe, (round, None) for a
            round skipped or failed.
        every_round: queue every round (no skipping); None = ``evaluation.server_probe_every_round``.

    Raises:
        ValueError: no cohort configured. ``CohortError``: the folder is missing or holds no site.
    """

    def __init__(self, cfg: ExperimentConfig, logger: RunLogger, cohort: str | Path | None = None,
                 seed: int | None = None, on_result: Callable[[int, dict[str, float] | None], None] | None = None,
                 every_round: bool | None = None) -> None:
        folder = cohort if cohort is not None else cfg.evaluation.server_cohort
        if not folder:
            raise ValueError("ServerProbe: no cohort (evaluation.server_cohort is empty)")
        self.cohort = Path(folder)
        list_sites(self.cohort)  # fail now, naming the folder, not in the first round
        self.cfg = cfg
        self.logger = logger
        self.seed = cfg.seed if seed is None else seed
        self.results: dict[int, dict[str, float]] = {}
        self.skipped: list[int] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._pending: collections.deque[tuple[int, dict[str, torch.Tensor]]] = collections.deque()
        self.every_round = cfg.evaluation.server_probe_every_round if every_round is None else every_round
        self._on_result = on_result
        self._encoder: PanOrganEncoder | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedpanfm-server-probe")
        # Reading the cohort is the pool's first job, so constructing the hook does not block either.
        self._batches = self._pool.submit(self._collate)

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, logger: RunLogger,
                    on_result: Callable[[int, dict[str, float] | None], None] | None = None) -> "ServerProbe | None":
        """The hook if ``evaluation.server_cohort`` names a cohort, else None (evaluation off)."""
        return cls(cfg, logger, on_result=on_result) if cfg.evaluation.server_cohort else None

    def batches(self) -> list[SubjectBatch]:
        """The collated labelled cohort (waits for the first read; raises its error)."""
        return self._batches.result()

    def _collate(self) -> list[SubjectBatch]:
        batches = collate_dataset(pooled_dataset(self.cohort, self.cfg), self.cfg)
        if not batches[0].label_names:
            raise ValueError(f"server cohort {self.cohort}: the manifests have no disease label column to probe")
        return batches

    def submit(self, server_round: int, state: dict[str, torch.Tensor]) -> None:
        """Queue the probe of this round's global weights and return at once.

        Args:
            server_round: the round (TensorBoard step).
            state: the global state dict after the round (only ``teacher.encoder.*`` is read and
                copied, so the caller may reuse or free ``state``).

        Raises:
            KeyError: ``state`` holds no teacher-encoder key.
            RuntimeError: the hook was closed.
        """
        teacher = {k[len(TEACHER_PREFIX):]: v.detach().to("cpu", copy=True)
                   for k, v in state.items() if k.startswith(TEACHER_PREFIX)}
        if not teacher:
            raise KeyError(f"server probe, round {server_round}: the global state has no '{TEACHER_PREFIX}*' key")
        with self._lock:
            if self._pending and not self.every_round:
                stale, _ = self._pending.popleft()
                self.skipped.append(stale)
                log.warning("server probe: round %d skipped, round %d is newer", stale, server_round)
                self._notify(stale, None)
            self._pending.append((server_round, teacher))
        self._pool.submit(self._run_pending)

    def _notify(self, server_round: int, values: dict[str, float] | None) -> None:
        if self._on_result is not None:
            try:
                self._on_result(server_round, values)
            except Exception as exc:  # noqa: BLE001 - the caller's display must not fail the probe
                log.error("server probe, round %d: result callback failed: %s", server_round, exc)

    def _run_pending(self) -> None:
        with self._lock:
            job = self._pending.popleft() if self._pending else None
        if job is None:  # an earlier job already took the newest round
            return
        server_round, teacher = job
        t0 = time.perf_counter()
        try:
            batches = self._batches.result()
            if self._encoder is None:
                self._encoder = PanOrganEncoder(self.cfg).requires_grad_(False).eval()
            self._encoder.load_state_dict(teacher, strict=True)
            values = probe_auroc(self._encoder, batches, self.cfg, self.seed)
            values["probe/seconds"] = time.perf_counter() - t0
            self.logger.scalars(values, server_round)
            self.logger.flush()
            self.results[server_round] = values
            self._notify(server_round, values)
            log.info("server probe, round %d: macro AUROC %s (%.1f s)", server_round,
                     f"{values['probe/auroc_macro']:.3f}" if "probe/auroc_macro" in values else "undefined",
                     values["probe/seconds"])
        except Exception as exc:  # reported now, raised by close(): training goes on meanwhile
            self.errors.append(f"round {server_round}: {type(exc).__name__}: {exc}")
            log.error("server probe, round %d failed (cohort %s): %s", server_round, self.cohort, exc)
            self._notify(server_round, None)

    def close(self, raise_errors: bool = True) -> dict[int, dict[str, float]]:
        """Wait for the queued probes and stop the thread; round -> the values logged.

        Args:
            raise_errors: raise ``RuntimeError`` listing failed rounds (else they are only logged).
        """
        self._pool.shutdown(wait=True)
        if self._batches.exception() is not None and not self.errors:
            self.errors.append(f"reading the cohort: {self._batches.exception()}")
        if self.errors and raise_errors:
            raise RuntimeError(f"server probe on {self.cohort} failed: " + "; ".join(self.errors))
        return dict(sorted(self.results.items()))


__all__ = ["TEACHER_PREFIX", "ServerProbe"]

"""The TensorBoard of a federated run: the server's sub-run and one per site, written in order
on a thread of their own.

TensorBoard writes (protobuf building, file flushes) run while the server waits for the next
round's replies, off the round's critical path (docs/performance.md, item 4). A failed write is
raised at the next :meth:`RunBoard.write` (or at :meth:`RunBoard.wait` / :meth:`RunBoard.stop`),
never lost.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fedpanfm.site_names import check_site_name
from fedpanfm.tb import RunLogger, site_run_name


class RunBoard:
    """``tensorboard/server`` and ``tensorboard/site_<name>`` of one run.

    Args:
        tb_dir: the run's ``tensorboard`` folder.
        purge_step: a resumed run's first round: events an interrupted round wrote at or after it
            are hidden (None: a fresh run).
    """

    def __init__(self, tb_dir: Path, purge_step: int | None = None) -> None:
        self.dir = Path(tb_dir)
        self._purge = purge_step
        self.server = RunLogger(self.dir, "server", purge_step=purge_step)
        self.sites: dict[str, RunLogger] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tensorboard")
        self._jobs: list[Future[None]] = []

    def site(self, name: str) -> RunLogger:
        """The sub-run of site ``name`` (created on first use)."""
        if name not in self.sites:
            check_site_name(name, "TensorBoard site run")  # a name is a folder here: no "x/../y"
            self.sites[name] = RunLogger(self.dir, site_run_name(name), purge_step=self._purge)
        return self.sites[name]

    def write(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue one TensorBoard call on the writer thread; re-raise an earlier one's error."""
        done = [j for j in self._jobs if j.done()]
        self._jobs = [j for j in self._jobs if not j.done()]
        for job in done:
            job.result()
        self._jobs.append(self._pool.submit(fn, *args))

    def flush(self) -> None:
        """Queue a flush of every sub-run."""
        for logger in [self.server, *self.sites.values()]:
            self.write(logger.flush)

    def wait(self) -> None:
        """Block until every queued call ran; re-raises the first error."""
        jobs, self._jobs = self._jobs, []
        for job in jobs:
            job.result()

    def stop(self) -> Exception | None:
        """Run what is queued and end the writer thread; the first failed write, returned (the
        caller closes the run before raising it)."""
        failed: Exception | None = None
        try:
            self.wait()
        except Exception as exc:  # noqa: BLE001 - handed to the caller, raised once the run is closed
            failed = exc
        finally:
            self._pool.shutdown(wait=True)
        return failed

    def close(self, hparams: dict[str, Any], final: dict[str, float]) -> None:
        """Record the hyper-parameters with the run's final metrics and close every sub-run
        (after :meth:`stop`: these calls run on the caller's thread)."""
        self.server.hparams(hparams, final)
        for logger in [self.server, *self.sites.values()]:
            logger.close()


__all__ = ["RunBoard"]

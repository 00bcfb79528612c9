"""Per-step training curves at each site, on the federation's global step.

The server's TensorBoard has one point per round per site (what the replies carry). A site also
writes its own scalars after every optimiser step, at step = the site's schedule position at the
round's start + the local step (``LocalTrainer.step`` continues from the position the round set),
so consecutive rounds join into one curve and sites overlay on one x axis.

Where (our choice; nothing crosses to the server):

- in simulation (node config ``partition-id``), under the run folder the ServerApp writes:
  ``<run>/tensorboard/site_<name>/steps/``, beside the site's per-round sub-run;
- at a deployed site, under the folder its node config names as ``tensorboard-dir`` (the site's
  own disk): ``<tensorboard-dir>/site_<name>/steps/``; without that key no per-step curves.

Tags are the training metrics of the step: ``loss/total``, ``loss/dino``, ``loss/ibot``,
``schedule/lr`` ... (non-finite values, e.g. a per-organ value for an absent organ, are left out).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Message

from fedpanfm.config import ExperimentConfig

#: Node-config key of a deployed site's TensorBoard folder.
NODE_TB_DIR = "tensorboard-dir"
SUB_RUN = "steps"

StepCallback = Callable[[int, Mapping[str, float]], None]

#: The TensorBoard root of the current call in simulation (set by :func:`with_run_folder`).
_SIM_ROOT: contextvars.ContextVar[Path | None] = contextvars.ContextVar("fedpanfm_step_curves_root", default=None)


class with_run_folder:  # noqa: N801 - used like a function wrapper
    """``fn`` run with the run folder of an in-process simulation known to :func:`step_curves`.

    A class, not a closure: Flower ships the ClientApp to its Ray actors by pickling, and an
    instance of a module-level class pickles by reference (a closure would drag the ContextVar
    along, which cannot be pickled).

    Args:
        fn: the site's train handler.
        run_config: the run config the ClientApp was built with (None: the context's).
    """

    def __init__(self, fn: Callable[[Message, Context, ExperimentConfig], Message],
                 run_config: Mapping[str, Any] | None) -> None:
        self.fn = fn
        self.run_config = run_config

    def __call__(self, msg: Message, context: Context, cfg: ExperimentConfig) -> Message:
        resolved = self.run_config if self.run_config is not None else context.run_config
        folder = str(resolved.get("run-folder") or "")
        root = Path(folder) / "tensorboard" if folder and "partition-id" in context.node_config else None
        token = _SIM_ROOT.set(root)
        try:
            return self.fn(msg, context, cfg)
        finally:
            _SIM_ROOT.reset(token)


def curves_root(node_config: Mapping[str, Any]) -> Path | None:
    """The TensorBoard root per-step curves go under (module docstring); None: not written."""
    if "partition-id" in node_config:
        return _SIM_ROOT.get()
    folder = str(node_config.get(NODE_TB_DIR, "") or "")
    return Path(folder) if folder else None


@contextlib.contextmanager
def step_curves(node_config: Mapping[str, Any], site: str, cfg: ExperimentConfig) -> Iterator[StepCallback | None]:
    """An ``on_step(step, values)`` for ``LocalTrainer.fit`` writing the site's per-step scalars,
    closed after the block; None when the site writes none (module docstring)."""
    from fedpanfm.site_names import check_site_name
    from fedpanfm.tb import RunLogger, site_run_name

    root = curves_root(node_config)
    if root is None or not cfg.logging.tensorboard:
        yield None
        return
    with RunLogger(root / site_run_name(check_site_name(site, "per-step curves")), SUB_RUN) as tb:
        def on_step(step: int, values: Mapping[str, float]) -> None:
            tb.scalars({(k if "/" in k else f"{k}/total"): float(v) for k, v in values.items()
                        if math.isfinite(float(v))}, step)

        yield on_step


__all__ = ["NODE_TB_DIR", "SUB_RUN", "curves_root", "step_curves", "with_run_folder"]

"""Resuming a federation: find the last complete round's checkpoint and its server state.

Every round's checkpoint (``checkpoints/round_<k>``, orchestration/checkpoints.py) holds the
global weights, teacher included, and in ``meta.json`` under ``"server"`` the rest of the
server's state (:func:`server_state`). What is not stored because it is a function of the
round: the sites' schedule position (``FedPanFM.start_step``), the director momentum
(``director_momentum(cfg, round, steps)``), the node sampling and DP noise (seeded by
(seed, round)). docs/reliability.md lists what a resumed run can and cannot reproduce.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedpanfm.checkpoint import CheckpointError, load_checkpoint

log = logging.getLogger(__name__)

#: ``meta.json`` key of the server state.
SERVER = "server"


@dataclass
class ResumePoint:
    """The last complete round of a run.

    Args:
        round: the round the checkpoint closed.
        path: its checkpoint folder.
        state: the global state dict after it.
        server: the server state stored with it (:func:`server_state`).
        skipped: one line per newer checkpoint that failed verification.
    """

    round: int
    path: Path
    state: dict[str, torch.Tensor]
    server: dict[str, Any]
    skipped: list[str]

    @property
    def saliency(self) -> torch.Tensor:
        return torch.tensor(self.server["global_saliency"], dtype=torch.float64)


def server_state(server_round: int, saliency: torch.Tensor, best_round: int | None, best_loss: float | None,
                 history: list[dict[str, float]], failures: dict[str, int], stopped: str | None = None) -> dict[str, Any]:
    """The JSON server state stored with each round's checkpoint.

    Args:
        server_round: the round just closed.
        saliency: the global organ saliency after it.
        best_round: the best round so far (None: none).
        best_loss: its validation loss.
        history: the server scalars of every round so far (the summary is rebuilt from it).
        failures: site -> failures so far.
        stopped: why the run stopped, if it did.
    """
    return {"round": server_round, "global_saliency": [float(x) for x in saliency.tolist()],
            "best_round": best_round, "best_loss": best_loss, "history": history,
            "failures": dict(failures), "stopped": stopped}


def round_folders(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """``(k, checkpoints/round_<k>)``, newest first (temporary and link folders ignored)."""
    out = []
    for p in Path(ckpt_dir).glob("round_*"):
        suffix = p.name[len("round_"):]
        if suffix.isdigit() and p.is_dir() and not p.is_symlink():
            out.append((int(suffix), p))
    return sorted(out, reverse=True)


def find_resume_point(run_folder: Path) -> ResumePoint:
    """The newest checkpoint of ``run_folder`` that passes its checksums and holds server state.

    A newer checkpoint that fails (corrupt, partial, no server state) is skipped with a warning
    naming it and the reason; the previous one is used.

    Args:
        run_folder: a run folder (``config.yaml``, ``checkpoints/``).

    Raises:
        CheckpointError: when no checkpoint of the run can be used.
    """
    ckpt_dir = Path(run_folder) / "checkpoints"
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{run_folder}: no checkpoints folder to resume from")
    skipped: list[str] = []
    for k, path in round_folders(ckpt_dir):
        try:
            state, _, meta = load_checkpoint(path)
            server = meta.get(SERVER)
            if not isinstance(server, dict) or server.get("round") != k:
                raise CheckpointError(f"{path / 'meta.json'}: no server state for round {k}")
        except CheckpointError as exc:
            skipped.append(str(exc))
            log.warning("resume: skipping checkpoint round %d: %s; trying the previous round", k, exc)
            continue
        return ResumePoint(k, path, state, server, skipped)
    raise CheckpointError(f"{ckpt_dir}: no usable checkpoint to resume from"
                          + (f" ({len(skipped)} failed verification: {skipped[0]})" if skipped else ""))


def resume_command(run_folder: Path | str, coordinator_config: Path | str | None = None) -> str:
    """The command that continues ``run_folder``: ``fedpanfm simulate --resume`` in simulation
    (``coordinator_config`` None), else ``fedpanfm federation run --resume`` on the coordinator.

    Args:
        run_folder: the run folder.
        coordinator_config: the coordinator's YAML; "" names it by a placeholder (the ServerApp
            does not know which file the operator used).
    """
    if coordinator_config is None:
        return f"fedpanfm simulate --resume {run_folder}"
    return f"fedpanfm federation run --config {coordinator_config or '<coordinator YAML>'} --resume {run_folder}"


__all__ = ["ResumePoint", "SERVER", "find_resume_point", "resume_command", "round_folders", "server_state"]

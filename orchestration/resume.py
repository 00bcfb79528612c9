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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedpanfm.checkpoint import CheckpointError, load_checkpoint, recover_checkpoint

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
        config: the experiment config stored with it (checksummed, as a plain mapping).
    """

    round: int
    path: Path
    state: dict[str, torch.Tensor]
    server: dict[str, Any]
    skipped: list[str]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def saliency(self) -> torch.Tensor:
        return torch.tensor(self.server["global_saliency"], dtype=torch.float64)


def server_state(server_round: int, saliency: torch.Tensor, best_round: int | None, best_loss: float | None,
                 history: list[dict[str, float]], failures: dict[str, int], stopped: str | None = None,
                 site_steps: dict[str, int] | None = None) -> dict[str, Any]:
    """The JSON server state stored with each round's checkpoint.

    Args:
        server_round: the round just closed.
        saliency: the global organ saliency after it.
        best_round: the best round so far (None: none).
        best_loss: its validation loss.
        history: the server scalars of every round so far (the summary is rebuilt from it).
        failures: site -> failures so far.
        stopped: why the run stopped, if it did.
        site_steps: site -> optimiser steps it reported so far.
    """
    return {"round": server_round, "global_saliency": [float(x) for x in saliency.tolist()],
            "best_round": best_round, "best_loss": best_loss, "history": history,
            "failures": dict(failures), "stopped": stopped, "site_steps": dict(site_steps or {})}


def round_folders(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """``(k, checkpoints/round_<k>)``, newest first (temporary and link folders ignored; a round a
    crash left moved aside mid-replace is moved back first, fedpanfm/checkpoint.py)."""
    for aside in Path(ckpt_dir).glob(".round_*.old-*"):
        recover_checkpoint(Path(ckpt_dir) / aside.name[1:].split(".old-")[0])
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
            state, config, meta = load_checkpoint(path)
            server = meta.get(SERVER)
            if not isinstance(server, dict) or server.get("round") != k:
                raise CheckpointError(f"{path / 'meta.json'}: no server state for round {k}")
        except CheckpointError as exc:
            skipped.append(str(exc))
            log.warning("resume: skipping checkpoint round %d: %s; trying the previous round", k, exc)
            continue
        return ResumePoint(k, path, state, server, skipped, config)
    raise CheckpointError(f"{ckpt_dir}: no usable checkpoint to resume from"
                          + (f" ({len(skipped)} failed verification: {skipped[0]})" if skipped else ""))


def resume_config(run_folder: Path, point: ResumePoint) -> dict[str, Any]:
    """The experiment config a resumed run continues with: the checkpoint's, which its
    ``SHA256SUMS`` cover, never the run folder's unchecked ``config.yaml`` alone.

    The folder's ``config.yaml`` (what ``federation run --resume`` sends the sites) must say the
    same; a copy edited after the run started is refused.

    Args:
        run_folder: the run folder.
        point: its resume point (:func:`find_resume_point`).

    Raises:
        CheckpointError: the folder's ``config.yaml`` differs from the checksummed config (the
            message names the first key that differs), or is not valid YAML.
    """
    import yaml

    stored = Path(run_folder) / "config.yaml"
    if stored.is_file():
        try:
            text = yaml.safe_load(stored.read_text())
        except yaml.YAMLError as exc:
            raise CheckpointError(f"{stored}: not valid YAML: {exc}") from None
        differs = _first_difference(text, point.config)
        if differs is not None:
            raise CheckpointError(
                f"{stored} differs from the checksummed config of {point.path} at {differs}: it was changed after "
                f"the run started; refusing to resume (restore it from {point.path / 'config.yaml'})")
    return point.config


def _first_difference(a: Any, b: Any, key: str = "") -> str | None:
    """The first dotted key where two YAML trees differ (None when equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            where = f"{key}.{k}" if key else str(k)
            if k not in a or k not in b:
                return where
            found = _first_difference(a[k], b[k], where)
            if found is not None:
                return found
        return None
    return None if a == b else (key or "<top level>")


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
    return f"fedpanfm federation run --coordinator-config {coordinator_config or '<coordinator YAML>'} --resume {run_folder}"


__all__ = ["ResumePoint", "SERVER", "find_resume_point", "resume_command", "resume_config", "round_folders",
           "server_state"]

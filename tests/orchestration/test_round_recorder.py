"""The server's run recorder: TensorBoard writes off the round's critical path (in order, on a
thread of their own), their errors surfacing, and the checkpoint taken from the strategy's
tensors without decoding the round's arrays again."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import global_model_state, tiny_config

from fedpanfm.checkpoint import load_checkpoint
from fedpanfm.federation.tensor_codec import state_to_arrayrecord
from fedpanfm.tb import read_scalars
from orchestration.server_app import RunRecorder


def _grid() -> SimpleNamespace:
    return SimpleNamespace(evaluate_replies=[], bytes_sent=0, bytes_received=0)


def test_writes_land_in_order_and_the_checkpoint_holds_the_strategys_state(tmp_path: Path) -> None:
    cfg = tiny_config()
    state = global_model_state(cfg)
    held = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    rec = RunRecorder(tmp_path / "run", cfg, _grid(), global_state=lambda: held)
    rec.after_round(0, state_to_arrayrecord(state))
    for r in (1, 2):
        # The arrays Flower hands over are ignored in favour of the strategy's tensors: a state
        # that differs from them shows which one was written.
        rec.after_round(r, state_to_arrayrecord(state))
    summary = rec.finish()
    server = read_scalars(Path(summary["tensorboard"]) / "server")
    assert [s for s, _ in server["system/time/round_s"]] == [1, 2]
    assert [s for s, _ in server["system/time/server/checkpoint_submit_s"]] == [1, 2]
    saved, _, meta = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest")
    assert meta["round"] == 2 and set(saved) == set(held)
    assert all(torch.equal(saved[k], held[k]) for k in held)


def test_a_failed_write_is_raised(tmp_path: Path) -> None:
    rec = RunRecorder(tmp_path / "run", tiny_config(), _grid())
    rec.board.write(rec.server.scalars, {"bad/tag": math.nan}, 1)
    with pytest.raises(ValueError, match="bad/tag"):
        rec.board.wait()
    rec.board.write(rec.server.scalars, {"bad/again": math.inf}, 2)
    with pytest.raises(ValueError, match="bad/again"):
        rec.finish()
    # The run was still closed: checkpoints flushed, summary written.
    assert (tmp_path / "run" / "summary.json").is_file()

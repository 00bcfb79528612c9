"""TensorBoard run logger: tags written by RunLogger come back through EventAccumulator."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fedpanfm.tb import RunLogger, read_scalars


def test_scalars_round_trip(tmp_path: Path) -> None:
    with RunLogger(tmp_path, "site_a") as tb:
        for step in range(3):
            tb.scalars({"loss/dino": 1.0 / (step + 1), "saliency/heart": 0.25 * step,
                        "expert_usage/layer0/e1": 0.5, "schedule/lr": 1e-4 * step}, step)
        tb.hparams({"model.dim": 32, "train.masking.policy": "sgm", "organs": ["a", "b"]}, {"final/loss": 0.5})
    got = read_scalars(tmp_path / "site_a")
    assert [s for s, _ in got["loss/dino"]] == [0, 1, 2]
    assert [v for _, v in got["loss/dino"]] == pytest.approx([1.0, 0.5, 1.0 / 3])
    assert [v for _, v in got["saliency/heart"]] == pytest.approx([0.0, 0.25, 0.5])
    assert got["expert_usage/layer0/e1"] == [(0, 0.5), (1, 0.5), (2, 0.5)]
    assert got["final/loss"] == [(0, 0.5)]
    # one event folder per sub-run, nothing else created under the run
    assert [p.name for p in tmp_path.iterdir()] == ["site_a"]


def test_sub_runs_are_separate(tmp_path: Path) -> None:
    for name, v in (("server", 1.0), ("site_b", 2.0)):
        with RunLogger(tmp_path, name) as tb:
            tb.scalars({"loss/total": v}, 0)
    assert read_scalars(tmp_path / "server")["loss/total"] == [(0, 1.0)]
    assert read_scalars(tmp_path / "site_b")["loss/total"] == [(0, 2.0)]


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="run name"):
        RunLogger(tmp_path, "../escape")
    with RunLogger(tmp_path, "pretrain") as tb:
        with pytest.raises(ValueError, match="'loss/dino' at step 4 is nan"):
            tb.scalars({"loss/dino": math.nan}, 4)
        tb.hparams({"a": 1}, {})
        with pytest.raises(RuntimeError, match="already called"):
            tb.hparams({"a": 1}, {})
    with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
        read_scalars(tmp_path / "nothing")

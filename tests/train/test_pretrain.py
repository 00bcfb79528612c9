"""`fedpanfm pretrain` end to end on a tiny synthetic cohort: checkpoints, TensorBoard events, errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, tiny_config

from fedpanfm.checkpoint import load_checkpoint
from fedpanfm.config import config_from_dict
from fedpanfm.data.synthetic import generate_cohort
from fedpanfm.tb import read_scalars
from fedpanfm.train.commands import register
from fedpanfm.train.pretrain import expert_usage_scalars


def run_cli(argv: list[str]) -> int:
    """``fedpanfm <argv>`` with only the pretrain plugin (independent of installed entry points)."""
    parser = argparse.ArgumentParser(prog="fedpanfm")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    raw = yaml.safe_load(yaml.safe_dump(TINY))
    raw["train"]["epochs"] = 2
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_pretrain_end_to_end(tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_config()
    cohort = tmp_path / "cohort"
    generate_cohort(cohort, cfg)
    run = tmp_path / "run"
    rc = run_cli(["pretrain", "--config", str(config_file), "--cohort", str(cohort), "--out", str(run),
               "--set", "train.masking.policy=sgm"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "epoch 2/2" in out and "pretrain done" in out

    ckpts = run / "checkpoints"
    assert (ckpts / "epoch_1").is_dir() and (ckpts / "epoch_2").is_dir()
    assert (ckpts / "latest").resolve() == (ckpts / "epoch_2").resolve()
    state, cfg_dict, meta = load_checkpoint(ckpts / "latest")
    assert meta["epoch"] == 2 and meta["kind"] == "pretrain"
    assert config_from_dict(cfg_dict).train.epochs == 2
    assert any(k.startswith("student.encoder.blocks.0.mlp.experts.") for k in state)
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    # 2 sites x 6 subjects, val_fraction 0.2 -> 1 held out per site -> 10 train in 3 batches of <= 4
    steps = meta["schedule"]["step"]
    assert steps == 2 * 3 == meta["schedule"]["total_steps"]

    tags = read_scalars(run / "pretrain")
    assert [s for s, _ in tags["loss/total"]] == list(range(steps))
    for tag in ("loss/dino", "loss/ibot", "schedule/lr", "schedule/teacher_momentum",
                "saliency/heart", "mask_rate/adipose", "expert_usage/layer0/e0", "val/loss/total", "epoch"):
        assert tag in tags, tag
    assert [v for _, v in tags["epoch"]] == [1.0, 2.0]
    usage = sum(tags[f"expert_usage/layer1/e{e}"][-1][1] for e in range(cfg.model.dex.experts))
    assert usage == pytest.approx(1.0)


def test_pretrain_errors(tmp_path: Path, config_file: Path) -> None:
    # FileNotFoundError / ValueError: `fedpanfm` prints these as "fedpanfm: error: ..." with exit code 1
    with pytest.raises(FileNotFoundError, match="missing not found: pretrain generates nothing"):
        run_cli(["pretrain", "--config", str(config_file), "--cohort", str(tmp_path / "missing"), "--out", str(tmp_path / "r")])
    (tmp_path / "r" / "checkpoints").mkdir(parents=True)
    cohort = tmp_path / "c"
    generate_cohort(cohort, tiny_config())
    with pytest.raises(ValueError, match="already holds a pretrain run"):
        run_cli(["pretrain", "--config", str(config_file), "--cohort", str(cohort), "--out", str(tmp_path / "r")])


def test_expert_usage_scalars() -> None:
    gm = torch.tensor([[1.0, 3.0], [0.0, 0.0]], dtype=torch.float64)
    assert expert_usage_scalars(gm) == {"expert_usage/layer0/e0": 0.25, "expert_usage/layer0/e1": 0.75}

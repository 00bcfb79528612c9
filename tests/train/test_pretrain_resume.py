"""`fedpanfm pretrain --resume`: a run stopped after an epoch and resumed ends where the
uninterrupted run ends; the run folder records every invocation."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import TINY, tiny_config

from fedpanfm.checkpoint import load_checkpoint, point_latest
from fedpanfm.data.synthetic import generate_cohort
from fedpanfm.tb import read_scalars
from fedpanfm.train.commands import register
from fedpanfm.train.pretrain import TRAINER_STATE

#: Stated tolerance of a resumed run against the uninterrupted one (CPU, fp32).
TOLERANCE = 1e-6


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedpanfm")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def two_runs(tmp_path: Path, **train: int) -> tuple[Path, Path]:
    """Two identical pretrain runs of the tiny config with ``train`` overrides: (whole, parted)."""
    raw = yaml.safe_load(yaml.safe_dump(TINY))
    raw["train"].update(train)
    raw["device"] = "cpu"
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    cohort = tmp_path / "cohort"
    generate_cohort(cohort, tiny_config())
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    for out in (whole, parted):
        assert run_cli(["pretrain", "--config", str(config), "--cohort", str(cohort), "--out", str(out)]) == 0
    return whole, parted


@pytest.mark.timeout(600)
def test_resumed_pretrain_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    whole, parted = two_runs(tmp_path, epochs=2)
    # ``parted`` stops after epoch 1: its epoch-2 checkpoint never happened (its TensorBoard events
    # of epoch 2 stay on disk, as an interrupted epoch's would, and must be hidden on resume).
    shutil.rmtree(parted / "checkpoints" / "epoch_2")
    point_latest(parted / "checkpoints" / "latest", parted / "checkpoints" / "epoch_1")
    assert (parted / "checkpoints" / "epoch_1" / TRAINER_STATE).is_file()
    assert run_cli(["pretrain", "--resume", str(parted)]) == 0

    a, _, meta_a = load_checkpoint(whole / "checkpoints" / "latest")
    b, _, meta_b = load_checkpoint(parted / "checkpoints" / "latest")
    assert meta_a["epoch"] == meta_b["epoch"] == 2 and meta_a["schedule"] == meta_b["schedule"]
    assert set(a) == set(b)
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())
    assert worst <= TOLERANCE, worst
    # Without the restored moments and RNG the second epoch differs: the comparison has teeth.
    moved = max(float((a[k] - load_checkpoint(whole / "checkpoints" / "epoch_1")[0][k]).abs().max())
                for k in a if a[k].is_floating_point())
    assert moved > 100 * TOLERANCE

    # TensorBoard continues at the next step, each step once, with the same losses.
    sa, sb = read_scalars(whole / "pretrain"), read_scalars(parted / "pretrain")
    assert [s for s, _ in sb["loss/total"]] == [s for s, _ in sa["loss/total"]]
    assert [v for _, v in sb["loss/total"]] == pytest.approx([v for _, v in sa["loss/total"]], abs=1e-5)
    # The folder explains itself: both invocations recorded, the log of both in run.log.
    assert (parted / "command.txt").read_text().count("\n# ") + 1 == 2  # one entry per invocation
    assert len(json.loads((parted / "environment.json").read_text())["sessions"]) == 2
    assert "resuming" in (parted / "run.log").read_text()
    assert (parted / "config.yaml").is_file()
    with pytest.raises(ValueError, match="all 2 epochs are done"):
        run_cli(["pretrain", "--resume", str(parted)])


@pytest.mark.timeout(600)
def test_checkpoint_every_validates_and_checkpoints_every_kth_epoch_and_the_last(tmp_path: Path) -> None:
    whole, parted = two_runs(tmp_path, epochs=3, checkpoint_every=2)
    assert sorted(p.name for p in (whole / "checkpoints").glob("epoch_*")) == ["epoch_2", "epoch_3"]
    scalars = read_scalars(whole / "pretrain")
    per_epoch = [v for _, v in scalars["epoch"]]
    assert per_epoch == [1.0, 2.0, 3.0]  # training scalars every epoch ...
    val_steps = [s for s, _ in scalars["val/loss/total"]]
    assert val_steps == [s for s, v in scalars["epoch"] if v in (2.0, 3.0)]  # ... validation when due
    # Resuming after the epoch-2 checkpoint replays epoch 3 and ends where the whole run did.
    shutil.rmtree(parted / "checkpoints" / "epoch_3")
    point_latest(parted / "checkpoints" / "latest", parted / "checkpoints" / "epoch_2")
    assert run_cli(["pretrain", "--resume", str(parted)]) == 0
    a, _, _ = load_checkpoint(whole / "checkpoints" / "latest")
    b, _, meta_b = load_checkpoint(parted / "checkpoints" / "latest")
    assert meta_b["epoch"] == 3
    assert max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point()) <= TOLERANCE

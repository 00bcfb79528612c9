"""Checkpoints that survive failures (issue 15, item 6): a failed write stops the run at that round
with the last good checkpoint intact (the policy alone, and a whole simulation); replacing a
checkpoint leaves no crash window; resume continues with the checksummed config and refuses a
tampered one."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config

import fedpanfm.checkpoint as ckpt_mod
from fedpanfm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from orchestration.checkpoints import CheckpointPolicy, CheckpointWriteFailed
from orchestration.deploy_commands import check_resumable
from orchestration.resume import find_resume_point, resume_config, server_state

ROOT = Path(__file__).resolve().parents[2]


def _server(k: int) -> dict:
    return server_state(k, torch.full((7,), 1 / 7, dtype=torch.float64), None, None, [{"round": k}], {})


def test_a_failed_write_stops_at_that_round_and_keeps_the_last_good_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config()
    policy = CheckpointPolicy(tmp_path / "checkpoints", cfg)
    policy.submit(1, {"w": torch.full((3,), 1.0)}, 2.0, {"server": _server(1)})
    assert policy.wait_round(1).name == "round_1"

    real_save = ckpt_mod.save_file

    def disk_full(tensors, filename, *args, **kwargs):  # type: ignore[no-untyped-def]
        real_save(tensors, filename, *args, **kwargs)  # the file is half there when the disk fills
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "save_file", disk_full)
    policy.submit(2, {"w": torch.full((3,), 2.0)}, 1.0, {"server": _server(2)})
    with pytest.raises(CheckpointWriteFailed) as info:
        policy.wait_round(2, "fedpanfm simulate --resume RUN")
    text = str(info.value)
    assert "checkpoint of round 2 could not be written" in text and "No space left on device" in text
    assert "the run stops after round 2" in text and "round_1 (round 1" in text
    assert text.endswith("resume with: fedpanfm simulate --resume RUN")
    policy.close()  # already reported: closing does not raise it again

    ckpt = tmp_path / "checkpoints"
    assert not (ckpt / "round_2").exists() and not list(ckpt.glob(".round_2.tmp-*"))
    state, _, meta = load_checkpoint(ckpt / "latest")
    assert meta["round"] == 1 and torch.equal(state["w"], torch.full((3,), 1.0))
    assert find_resume_point(tmp_path).round == 1


def test_replacing_a_checkpoint_swaps_it_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config()
    path = tmp_path / "round_1"
    save_checkpoint(path, {"w": torch.zeros(2)}, cfg, {"v": 1})

    # A crash right after the swap (before the old copy is removed): the new one is in place.
    def crash(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt("crash")

    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"w": torch.ones(2)}, cfg, {"v": 2})
    monkeypatch.undo()
    state, _, meta = load_checkpoint(path)
    assert meta == {"v": 2} and torch.equal(state["w"], torch.ones(2))
    assert list(tmp_path.glob(".round_1.tmp-*"))  # the old copy, left over by the crash
    save_checkpoint(path, {"w": torch.full((2,), 3.0)}, cfg, {"v": 3})
    assert load_checkpoint(path)[2] == {"v": 3} and not list(tmp_path.glob(".round_1.*"))


def test_a_crash_between_the_fallback_renames_leaves_a_loadable_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the atomic swap is not available: old moved aside, then the crash."""
    cfg = tiny_config()
    run = tmp_path / "run"
    ckpt = run / "checkpoints"
    save_checkpoint(ckpt / "round_1", {"w": torch.zeros(2)}, cfg, {"server": _server(1)})
    (run / "config.yaml").write_text(cfg.to_yaml())
    monkeypatch.setattr(ckpt_mod, "_swap_folders", lambda a, b: False)
    real_replace, calls = os.replace, []

    def replace(src, dst):  # type: ignore[no-untyped-def]
        calls.append((src, dst))
        if len(calls) == 2:  # the process dies between the two renames
            raise SystemExit("killed")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", replace)
    with pytest.raises(SystemExit):
        save_checkpoint(ckpt / "round_1", {"w": torch.ones(2)}, cfg, {"server": _server(1)})
    monkeypatch.undo()
    assert not (ckpt / "round_1").exists() and list(ckpt.glob(".round_1.old-*"))  # the window
    point = find_resume_point(run)  # moves the previous checkpoint back first
    assert point.round == 1 and torch.equal(point.state["w"], torch.zeros(2))
    assert (ckpt / "round_1").is_dir() and not list(ckpt.glob(".round_1.old-*"))


def test_resume_uses_the_checksummed_config_and_refuses_a_tampered_one(tmp_path: Path) -> None:
    cfg = tiny_config(["federation.rounds=4"])
    run = tmp_path / "run"
    policy = CheckpointPolicy(run / "checkpoints", cfg)
    for k in (1, 2):
        policy.submit(k, {"w": torch.full((3,), float(k))}, 2.0, {"server": _server(k)})
    policy.close()
    (run / "config.yaml").write_text(cfg.to_yaml())
    point = find_resume_point(run)
    assert resume_config(run, point) == yaml.safe_load(cfg.to_yaml())
    assert check_resumable(run).startswith(f"resuming {run} after round 2 of 4")

    # The run folder's config.yaml edited after the run started (more rounds, another cohort).
    tampered = yaml.safe_load(cfg.to_yaml())
    tampered["federation"]["rounds"] = 40
    (run / "config.yaml").write_text(yaml.safe_dump(tampered))
    with pytest.raises(CheckpointError, match=r"config.yaml differs from the checksummed config of .*round_2 at "
                                              r"federation.rounds: it was changed after the run started"):
        resume_config(run, find_resume_point(run))
    with pytest.raises(ValueError, match="federation.rounds"):
        check_resumable(run)

    # The checkpoint's own config.yaml edited: its checksum fails, the round is not used.
    (run / "config.yaml").write_text(cfg.to_yaml())
    stored = run / "checkpoints" / "round_2" / "config.yaml"
    stored.write_text(stored.read_text().replace("rounds: 4", "rounds: 40"))
    point = find_resume_point(run)
    assert point.round == 1 and "round_2/config.yaml: checksum mismatch" in point.skipped[0]


@pytest.mark.timeout(600)
def test_a_failed_write_stops_a_whole_simulation_at_that_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real simulation (Flower's runtime, 2 sites, 3 rounds planned) whose round-2 checkpoint
    cannot be written: the disk fills while its weights file is written (an injected ENOSPC, which
    root cannot get around as it can a chmod). The run stops after round 2 with the message naming
    the round, the last complete checkpoint and the resume command; round 1's checkpoint is intact
    and verifies; round 3 never runs."""
    from fedpanfm.tb import read_scalars
    from orchestration.simulate import simulate

    real_save, written = ckpt_mod.save_file, []

    def disk_full_in_round_2(tensors, filename, *args, **kwargs):  # type: ignore[no-untyped-def]
        folder = Path(filename).parent.name  # save_checkpoint writes into .round_<k>.tmp-*, then swaps it in
        written.append(folder.split(".tmp-")[0])
        real_save(tensors, filename, *args, **kwargs)
        if folder.startswith(".round_2.tmp-"):
            raise OSError(errno.ENOSPC, "No space left on device")

    # The ServerApp (and so the checkpoint writer) runs in this process under `simulate`.
    monkeypatch.setattr(ckpt_mod, "save_file", disk_full_in_round_2)
    run = tmp_path / "run"
    overrides = [f"cohort={tmp_path / 'cohort'}", "synth.sites=2", "synth.subjects=4", "federation.rounds=3",
                 "federation.min_sites=2", "data.val_fraction=0", "data.batch_size=2", "evaluation.server_cohort="]
    with pytest.raises(CheckpointWriteFailed) as info:  # the ServerApp's error, passed on by Flower's runtime
        simulate(ROOT / "configs" / "quickstart.yaml", overrides, run_folder=run, cpus=2)
    text = str(info.value)
    ckpt = run / "checkpoints"
    assert text.startswith(f"checkpoint of round 2 could not be written to "
                           f"{ckpt / 'round_2'} (OSError: [Errno 28] No space left on device); the run stops after "
                           f"round 2: the last complete checkpoint is {ckpt / 'round_1'} (round 1; `latest` still "
                           "points at it)"), text
    assert f"then resume with: fedpanfm simulate --resume {run}" in text, text

    # Round 1's checkpoint is complete and verifies (checksums); round 2 left nothing behind.
    state, _, meta = load_checkpoint(ckpt / "latest")
    assert meta["round"] == 1 and (ckpt / "latest").resolve() == (ckpt / "round_1").resolve() and state
    assert find_resume_point(run).round == 1
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "round_1"]
    # No round 3: the writer saw rounds 1 and 2 only, and the server logged two rounds.
    assert written == [".round_1", ".round_2"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == 2 and len(summary["seconds_per_round"]) == 2
    assert summary["stopped"] == f"CheckpointWriteFailed: {text}"
    assert [step for step, _ in read_scalars(run / "tensorboard" / "server")["train/loss"]] == [1, 2]

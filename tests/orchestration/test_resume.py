"""Checkpoint + resume: a corrupt newest checkpoint falls back to the previous one, and a
SIGKILLed `fedpanfm simulate` resumes after its last complete round and finishes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from fedpanfm.checkpoint import CheckpointError, load_checkpoint
from fedpanfm.tb import read_scalars
from orchestration.checkpoints import CheckpointPolicy
from orchestration.resume import find_resume_point, server_state

ROOT = Path(__file__).resolve().parents[2]


def _write_rounds(run: Path, n: int) -> None:
    cfg = tiny_config()
    policy = CheckpointPolicy(run / "checkpoints", cfg)
    for k in range(1, n + 1):
        srv = server_state(k, torch.full((7,), 1 / 7, dtype=torch.float64), 1, 2.0, [{"round": k}], {"a": k})
        policy.submit(k, {"w": torch.full((3,), float(k))}, 2.0, {"server": srv})
    policy.close()


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path: Path, caplog) -> None:
    _write_rounds(tmp_path, 3)
    weights = tmp_path / "checkpoints" / "round_3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7] + b"garbage")
    # A partial write left behind by a kill: a temp folder, never a round_<k> folder.
    (tmp_path / "checkpoints" / ".round_4.tmp-x").mkdir()
    point = find_resume_point(tmp_path)
    assert point.round == 2 and torch.equal(point.state["w"], torch.full((3,), 2.0))
    assert point.server["failures"] == {"a": 2} and point.saliency.shape == (7,)
    assert len(point.skipped) == 1 and "checksum mismatch" in point.skipped[0]
    assert any("skipping checkpoint round 3" in r.getMessage() for r in caplog.records)


def test_no_usable_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    _write_rounds(tmp_path, 1)
    (tmp_path / "checkpoints" / "round_1" / "SHA256SUMS").unlink()
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        find_resume_point(tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_mid_run_then_resume_finishes(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    args = [sys.executable, "-m", "fedpanfm.cli", "simulate", "--config", str(ROOT / "configs" / "quickstart.yaml"),
            "--cpus", "2"]
    for kv in (f"cohort={tmp_path / 'cohort'}", f"logging.run_dir={runs}", "synth.sites=2", "synth.subjects=6",
               "federation.rounds=3", "federation.min_sites=2", "data.val_fraction=0.34", "data.batch_size=3"):
        args += ["--set", kv]
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    log_path = tmp_path / "simulate.log"
    log_file = log_path.open("wb")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while not list(runs.glob("*/checkpoints/round_1/SHA256SUMS")):
            assert proc.poll() is None, f"simulate exited before writing round 1:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no round-1 checkpoint within 400 s"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: server, Ray, site actors
        proc.wait(timeout=60)
        log_file.close()
    (run,) = runs.iterdir()
    killed_at = find_resume_point(run).round
    assert 1 <= killed_at < 3
    before = load_checkpoint(run / "checkpoints" / f"round_{killed_at}")[0]

    done = subprocess.run([sys.executable, "-m", "fedpanfm.cli", "simulate", "--resume", str(run), "--cpus", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from_round"] == killed_at and summary["rounds"] == 3 and summary["stopped"] is None
    # The resume point was not rewritten; later rounds exist and are finite.
    assert all(torch.equal(before[k], v) for k, v in load_checkpoint(run / "checkpoints" / f"round_{killed_at}")[0].items())
    final, _, meta = load_checkpoint(run / "checkpoints" / "latest")
    assert meta["round"] == 3 and meta["server"]["round"] == 3
    assert all(torch.isfinite(t).all() for t in final.values() if t.is_floating_point())
    # TensorBoard continues at the right step: every round once in the view, no duplicate.
    steps = [s for s, _ in read_scalars(run / "tensorboard" / "server")["train/loss"]]
    assert steps == [1, 2, 3]

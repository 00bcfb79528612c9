"""Resuming a deployed run without a deployment: what `federation run --resume` submits and
refuses, the ServerApp's resume hint, `flwr run` leaving pyproject.toml alone, the trainer
worker handing a resumed run the site state of the round it resumes after, and how
`federation run` follows a run (one line for a traceback, the full text in the log)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import tomllib
import torch
import yaml
from conftest import TINY, tiny_config

from fedpanfm.config import config_from_run_config
from orchestration.checkpoints import CheckpointPolicy
from orchestration.deploy_commands import check_resumable, follow, write_run_config
from orchestration.resume import resume_command, server_state
from orchestration.server_app import summary_text

ROOT = Path(__file__).resolve().parents[2]


def _run_folder(tmp_path: Path, rounds_done: int, rounds: int = 3) -> Path:
    run = tmp_path / "runs" / "deploytest"
    cfg = tiny_config([f"federation.rounds={rounds}"])
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    policy = CheckpointPolicy(run / "checkpoints", cfg)
    for k in range(1, rounds_done + 1):
        srv = server_state(k, torch.full((7,), 1 / 7, dtype=torch.float64), None, None, [{"round": k}], {})
        policy.submit(k, {"w": torch.full((3,), float(k))}, None, {"server": srv})
    policy.close()
    return run


def test_resume_run_config_carries_the_runs_own_config(tmp_path: Path) -> None:
    run = _run_folder(tmp_path, 2)
    rc = tomllib.loads(write_run_config(tmp_path / "rc.toml", run / "config.yaml", [], run, resume=True).read_text())
    assert rc["resume"] == str(run) and rc["run-folder"] == str(run) and rc["overrides"] == ""
    # Sites rebuild exactly the stored config from the run config alone.
    assert config_from_run_config(rc).to_dict() == tiny_config(["federation.rounds=3"]).to_dict()
    # `resume` must be an app config key, or flwr rejects the run config ("Invalid run configuration").
    app_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(rc) <= set(app_config) and app_config["resume"] == ""
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump(TINY))
    fresh = tomllib.loads(write_run_config(tmp_path / "rc2.toml", exp, [], run).read_text())
    assert "resume" not in fresh  # a new run leaves the pyproject default ""


def test_check_resumable_names_the_round_and_refuses_what_cannot_resume(tmp_path: Path) -> None:
    run = _run_folder(tmp_path, 2)
    assert check_resumable(run) == f"resuming {run} after round 2 of 3 ({run / 'checkpoints' / 'round_2'})"
    done = _run_folder(tmp_path / "b", 3)
    with pytest.raises(ValueError, match="round 3 of 3 is its last checkpoint: the run is complete"):
        check_resumable(done)
    with pytest.raises(ValueError, match="no config.yaml there"):
        check_resumable(tmp_path)
    (run / "checkpoints" / "round_1" / "SHA256SUMS").unlink()
    (run / "checkpoints" / "round_2" / "SHA256SUMS").unlink()
    with pytest.raises(ValueError, match="no usable checkpoint"):
        check_resumable(run)


def test_federation_run_resume_refuses_a_new_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedpanfm.cli import main

    run = _run_folder(tmp_path, 1)
    deployment = tmp_path / "deployment.yaml"
    deployment.write_text(yaml.safe_dump({"sites": {"a": ""}}))
    assert main(["federation", "run", "--coordinator-config", str(deployment), "--resume", str(run),
                 "--set", "federation.rounds=9"]) == 2
    assert "drop --experiment, --set and --run-folder" in capsys.readouterr().err


def test_resume_hint_names_the_command_for_the_runtime() -> None:
    assert resume_command("/r") == "fedpanfm simulate --resume /r"
    assert resume_command("/r", "") == "fedpanfm federation run --coordinator-config <coordinator YAML> --resume /r"
    summary = {"rounds": 1, "sites": ["a"], "stopped": "RoundFailed: round 2", "run_folder": "/r",
               "final_train_loss": 1.0, "final_val_loss": None, "best_val_loss": None, "best_round": None,
               "tensorboard": "/r/tensorboard", "checkpoint_latest": "/r/checkpoints/latest", "checkpoint_best": None}
    assert "resume with: fedpanfm simulate --resume /r" in summary_text(summary)
    deployed = {**summary, "resume_command": resume_command("/r", "deploy.yaml")}
    assert "resume with: fedpanfm federation run --coordinator-config deploy.yaml --resume /r" in summary_text(deployed)


def test_flwr_run_does_not_rewrite_pyproject() -> None:
    # Flower 1.41 migrates (and comments out) a [tool.flwr.federations] section on every `flwr
    # run`; this is its own check of whether it would.
    from flwr.cli.config_migration import _is_migratable

    migratable, reason = _is_migratable(ROOT)
    assert not migratable and "No '[tool.flwr.federations]' section" in str(reason)


def test_worker_gives_a_resumed_run_the_state_of_the_round_it_resumes_after(tmp_path: Path) -> None:
    from flwr.app import ConfigRecord, RecordDict

    from fedpanfm.federation.protocol import SERVER_CONFIG
    from sites.worker.server import KEPT_ROUNDS, KEPT_RUNS, TrainerWorker, _run_round
    from sites.worker.wire import ensure_authkey

    ensure_authkey(tmp_path / "k")
    worker = TrainerWorker(tmp_path / "s.sock", tmp_path / "k")
    states = {r: RecordDict({"fedpanfm.site": ConfigRecord({"round": r})}) for r in range(1, 6)}
    for r in (1, 2, 3, 4):  # the killed run: the site trained round 4 before the coordinator died
        worker.remember("/runs/a", r, states[r])
    assert sorted(worker.kept["/runs/a"]) == list(range(5 - KEPT_ROUNDS, 5))
    # The checkpoint of round 3 is the newest complete one: round 4 runs again from round 3's state.
    assert worker.restore("/runs/a", 4) is states[3]
    assert worker.restore("/runs/a", 3) is states[2]
    assert len(worker.restore("/runs/b", 4)) == 0 and len(worker.restore("/runs/a", 1)) == 0
    for i in range(KEPT_RUNS):
        worker.remember(f"/runs/other{i}", 1, states[1])
    assert "/runs/a" not in worker.kept and len(worker.kept) == KEPT_RUNS

    msg = RecordDict({SERVER_CONFIG: ConfigRecord({"server-round": 4})})
    assert _run_round({"run-folder": "/runs/a", "resume": ""}, msg) == ("/runs/a", 4)
    assert _run_round({"run-folder": "/x", "resume": "/runs/a"}, msg) == ("/runs/a", 4)
    assert _run_round({"run-folder": ""}, msg) == ("", 0)
    assert _run_round({"run-folder": "/runs/a"}, RecordDict()) == ("", 0)


def test_follow_prints_lines_and_keeps_a_traceback_to_the_log(tmp_path: Path) -> None:
    script = ("print('round 1: loss 2.5', flush=True)\n"
              "raise ConnectionError('SuperLink at 127.0.0.1:9092 went away')")
    out = io.StringIO()
    code, error = follow([sys.executable, "-c", script], {}, str(tmp_path), tmp_path / "run" / "f.log", None, out)
    assert code == 1 and error == "ConnectionError: SuperLink at 127.0.0.1:9092 went away"
    assert out.getvalue() == "round 1: loss 2.5\n"  # no traceback on the console
    logged = (tmp_path / "run" / "f.log").read_text()
    assert "Traceback (most recent call last)" in logged and "round 1: loss 2.5" in logged

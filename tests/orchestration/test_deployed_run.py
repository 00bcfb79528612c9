"""A deployed run's folder and what its operator sees, without a deployment: the ServerApp's run
folder preparation (run.log, environment.json; orchestration/deployed_run.py), `federation run`'s
command.txt, and the ServerApp's log stream as `federation run` shows it (orchestration/run_stream.py):
fedpanfm's per-round lines and one summary, Flower's per-round dumps left in the log."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import TINY

from fedpanfm.console import ROUNDS, RoundStatus
from fedpanfm.run_folder import COMMAND_FILE, ENVIRONMENT_FILE
from orchestration.deploy_commands import follow
from orchestration.deployed_run import OURS, deployed_run
from orchestration.server_app import summary_text

SERVER_LOG = logging.getLogger("orchestration.server_app")


def _run_config(tmp_path: Path, **extra: str) -> dict[str, Any]:
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(yaml.safe_dump({**TINY, "name": "deploytest"}))
    return {"config": str(experiment), "overrides": f"logging.run_dir={tmp_path / 'runs'}", "config-yaml": "",
            "run-folder": "", "resume": "", **extra}


def _summary(folder: Path) -> dict[str, Any]:
    return {"rounds": 2, "sites": ["hospital_a", "hospital_b"], "stopped": None, "run_folder": str(folder),
            "final_train_loss": 4.5, "final_val_loss": None, "best_val_loss": None, "best_round": None,
            "tensorboard": str(folder / "tensorboard"), "checkpoint_latest": str(folder / "checkpoints" / "latest"),
            "checkpoint_best": None, "failures": {}, "probe_auroc": {}}


def _serverapp_records(folder: Path) -> None:
    """What run_federation logs in a run of two rounds, through the real loggers."""
    ROUNDS.info("fedpanfm run %s: rounds %d..%d, writing to %s", "deploytest", 1, 2, folder,
                extra={"round_plan": (0, 2)})
    for r, loss in ((1, 5.046), (2, 4.5)):
        status = RoundStatus(round=r, last=2, train_loss=loss, entropy=0.95, sites_ok=2, seconds=40.0, bytes=1.7e6)
        ROUNDS.info("%s", status.line(), extra={"round_status": status})
        logging.getLogger("orchestration.checkpoints").info("checkpoint round %d written to %s", r, folder)
    SERVER_LOG.info("%s\n  summary: %s", summary_text(_summary(folder)), folder / "summary.json")


def test_deployed_serverapp_writes_run_log_and_environment(tmp_path: Path) -> None:
    stream = io.StringIO()
    with deployed_run(_run_config(tmp_path), 42, stream) as prepared:
        folder = Path(prepared["run-folder"])
        logging.getLogger("flwr").info("aggregate_train: round 1, 2 site updates, 0 dropped")
        _serverapp_records(folder)
    # A plain `flwr run` names no folder: the one naming scheme, under the config's run_dir.
    assert folder.parent == tmp_path / "runs" and re.fullmatch(r"deploytest-federation-\d{8}-\d{6}", folder.name)
    run_log = (folder / "run.log").read_text()
    assert "aggregate_train: round 1" in run_log and "round 2/2  train 4.500" in run_log
    assert run_log.count("fedpanfm: 2 rounds over sites hospital_a, hospital_b") == 1
    (entry,) = json.loads((folder / ENVIRONMENT_FILE).read_text())["sessions"]
    assert entry["command"] == "flwr-serverapp: the ServerApp of Flower run 42"
    assert entry["packages"]["flwr"] and entry["device"]["configured"] == "auto"  # the config's device
    # Our records, not Flower's, on the stream Flower uploads as the run's log.
    lines = stream.getvalue().splitlines()
    assert "INFO fedpanfm.rounds: round 1/2  train 5.046  val -  entropy 0.95  sites 2 ok  40.0 s  1.7 MB" in lines
    assert not any("aggregate_train" in line for line in lines)
    # The block leaves logging as it found it.
    assert all(not logging.getLogger(name).handlers for name in OURS)

    # The resumed run continues the same folder: the log and the environment record are appended.
    (folder / "config.yaml").write_text(yaml.safe_dump({**TINY, "name": "deploytest"}))
    with deployed_run(_run_config(tmp_path, resume=str(folder)), 43, io.StringIO()) as prepared:
        assert prepared["run-folder"] == str(folder)
        ROUNDS.info("resumed")
    assert (folder / "run.log").read_text().startswith(run_log) and "resumed" in (folder / "run.log").read_text()
    assert len(json.loads((folder / ENVIRONMENT_FILE).read_text())["sessions"]) == 2


#: Lines of a real `flwr run --stream` (tests/orchestration/test_deployment.py's federation_run.log), around
#: which the ServerApp's own records are placed.
FLOWER_HEAD = [
    "Using SuperLink: fedpanfm (127.0.0.1:32861)",
    "Successfully started run 7953450600785853801",
    "\x1b[92mINFO \x1b[0m:      Starting logstream for run_id `7953450600785853801`",
    "2026-11-30 23:21:08,244\tINFO worker.py:2012 -- Started a local Ray instance.",
    "/venv/lib/python3.11/site-packages/ray/_private/worker.py:2051: FutureWarning: Tip: In future versions of Ray, "
    "Ray will no longer override accelerator visible devices env var if num_gpus=0 or num_gpus=None (default).",
    "  warnings.warn(",
    "\x1b[93mWARNING \x1b[0m:   fraction_evaluate is set to 0.0. Federated evaluation will be skipped.",
    "\x1b[92mINFO \x1b[0m:      [ROUND 1/2]",
    "\x1b[92mINFO \x1b[0m:      \t└──> Aggregated MetricRecord: {'saliency/brain': 0.10318233713735248}",
    "\x1b[91mERROR \x1b[0m:     site hospital_b: reply dropped (timeout)",
    "Traceback (most recent call last):",
    '  File "/venv/lib/python3.11/site-packages/flwr/server/grid.py", line 1, in pull',
    "TimeoutError: no reply",
]
FLOWER_TAIL = [
    "\x1b[92mINFO \x1b[0m:      Final results:",
    "\x1b[92mINFO \x1b[0m:      \t{ 1: { 'train/loss': '5.0460e+00'}}",
]


def _stream(tmp_path: Path, folder: Path) -> Path:
    """A run's whole log stream: Flower's lines and the ServerApp's records as deployed_run writes them."""
    ours = io.StringIO()
    with deployed_run(_run_config(tmp_path, **{"run-folder": str(folder)}), 7, ours):
        _serverapp_records(folder)
    text = "\n".join(FLOWER_HEAD) + "\n" + ours.getvalue() + "\n".join(FLOWER_TAIL) + "\n"
    path = tmp_path / "stream.txt"
    path.write_text(text)
    return path


def _cat(path: Path) -> list[str]:
    return [sys.executable, "-c", f"import sys; sys.stdout.write(open({str(path)!r}).read())"]


def test_follow_shows_the_round_lines_warnings_and_errors_and_keeps_the_rest_in_the_log(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    stream = _stream(tmp_path, folder)
    out = io.StringIO()
    code, error = follow(_cat(stream), {}, str(tmp_path), folder / "federation_run.log", None, out)
    assert code == 0 and error == "TimeoutError: no reply"
    assert out.getvalue().splitlines() == [
        "Using SuperLink: fedpanfm (127.0.0.1:32861)",
        "Successfully started run 7953450600785853801",
        "\x1b[93mWARNING \x1b[0m:   fraction_evaluate is set to 0.0. Federated evaluation will be skipped.",
        "\x1b[91mERROR \x1b[0m:     site hospital_b: reply dropped (timeout)",
        # The lines after a traceback are shown again; the same round lines as `fedpanfm simulate`.
        f"fedpanfm run deploytest: rounds 1..2, writing to {folder}",
        "round 1/2  train 5.046  val -  entropy 0.95  sites 2 ok  40.0 s  1.7 MB",
        "round 2/2  train 4.500  val -  entropy 0.95  sites 2 ok  40.0 s  1.7 MB",
    ]
    assert (folder / "federation_run.log").read_text() == stream.read_text()  # everything, in order
    # -v: every line but the traceback.
    out = io.StringIO()
    follow(_cat(stream), {}, str(tmp_path), tmp_path / "v.log", None, out, verbose=True)
    shown = out.getvalue()
    assert "Aggregated MetricRecord" in shown and "INFO orchestration.server_app: fedpanfm: 2 rounds" in shown
    assert "Traceback" not in shown


def test_federation_run_output_has_the_round_lines_and_one_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`federation run` end to end with the Flower CLI replaced by the recorded stream: the
    operator's command in command.txt, the per-round lines, the summary once."""
    from fedpanfm.cli import main
    from orchestration import deploy_commands

    folder = tmp_path / "run"
    stream = _stream(tmp_path, folder)

    def submit_run(cfg: Any, experiment: Path, overrides: list[str], flwr_home: Path, run_folder: Path,
                   stream: bool, timeout_s: float | None, resume: bool, verbose: bool) -> dict[str, Any]:
        assert stream and run_folder == folder.resolve()
        log = run_folder / "federation_run.log"
        follow(_cat(stream_file), {}, str(tmp_path), log, None, verbose=verbose)
        (run_folder / "summary.json").write_text(json.dumps(_summary(run_folder)))  # what the ServerApp writes
        return {"log": str(log), "output": "", "error": ""}

    stream_file = stream
    monkeypatch.setattr(deploy_commands, "submit_run", submit_run)
    deployment = tmp_path / "deployment.yaml"
    deployment.write_text(yaml.safe_dump({"sites": {"hospital_a": "", "hospital_b": ""}}))
    argv = ["federation", "run", "--coordinator-config", str(deployment), "--experiment",
            str(tmp_path / "experiment.yaml"), "--run-folder", str(folder), "--flwr-home", str(tmp_path / "home")]
    monkeypatch.setattr(sys, "argv", ["/opt/venv/bin/fedpanfm", *argv])
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"run folder on the coordinator: {folder.resolve()}")
    assert "round 1/2  train 5.046" in out and "round 2/2  train 4.500" in out
    assert out.count("fedpanfm: 2 rounds over sites hospital_a, hospital_b") == 1
    assert "Aggregated MetricRecord" not in out
    commands = (folder / COMMAND_FILE).read_text().splitlines()
    assert commands[1] == "fedpanfm " + " ".join(argv)
    sessions = json.loads((folder / ENVIRONMENT_FILE).read_text())["sessions"]
    # The ServerApp's own entry (written while the stream was recorded) and the operator's.
    assert [s["command"] for s in sessions] == ["flwr-serverapp: the ServerApp of Flower run 7", commands[1]]

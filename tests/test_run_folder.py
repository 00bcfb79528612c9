"""Run folders: one naming scheme, and the record of how a run was made."""

from __future__ import annotations

import json
import re
from pathlib import Path

from fedpanfm.cli import output_folder
from fedpanfm.run_folder import COMMAND_FILE, ENVIRONMENT_FILE, git_state, new_run_folder, record_provenance


def test_one_naming_scheme_for_every_job(tmp_path: Path, monkeypatch) -> None:
    first = new_run_folder(tmp_path, "quickstart", "simulate")
    assert re.fullmatch(r"quickstart-simulate-\d{8}-\d{6}", first.name) and first.parent == tmp_path
    # Two runs started in the same second: the second gets a suffix, never an existing folder.
    monkeypatch.setattr("fedpanfm.run_folder.time.strftime", lambda fmt: "20260101-000000")
    new_run_folder(tmp_path, "q", "simulate").mkdir()
    assert new_run_folder(tmp_path, "q", "simulate").name == "q-simulate-20260101-000000-1"
    monkeypatch.undo()
    # The jobs' --out default goes through the same scheme.
    assert re.fullmatch(r"exp-pretrain-\d{8}-\d{6}(-\d+)?", output_folder(None, str(tmp_path), "exp", "pretrain").name)
    assert output_folder(str(tmp_path / "mine"), str(tmp_path), "exp", "pretrain") == tmp_path / "mine"


def test_provenance_records_command_versions_commit_host_and_device(tmp_path: Path) -> None:
    argv = ["/usr/bin/fedpanfm", "simulate", "--config", "configs/quickstart.yaml", "--set", "seed=1 2"]
    entry = record_provenance(tmp_path, "cpu", argv)
    assert (tmp_path / COMMAND_FILE).read_text().splitlines()[1] == \
        "fedpanfm simulate --config configs/quickstart.yaml --set 'seed=1 2'"
    env = json.loads((tmp_path / ENVIRONMENT_FILE).read_text())
    assert env["sessions"] == [entry]
    assert {"torch", "flwr", "ray", "deepspeed", "monai"} <= set(entry["packages"])
    assert entry["packages"]["torch"] and entry["packages"]["flwr"]
    assert entry["host"] and entry["device"]["configured"] == "cpu" and entry["device"]["cpu_count"] >= 1
    git = git_state()
    if git is not None:  # run from a checkout: the commit the code came from
        assert re.fullmatch(r"[0-9a-f]{40}", entry["git"]["commit"]) and isinstance(entry["git"]["dirty"], bool)
    # A resumed run adds its own invocation; the first is kept.
    record_provenance(tmp_path, "cpu", ["fedpanfm", "simulate", "--resume", str(tmp_path)])
    assert len(json.loads((tmp_path / ENVIRONMENT_FILE).read_text())["sessions"]) == 2
    assert (tmp_path / COMMAND_FILE).read_text().count("fedpanfm simulate") == 2


def test_git_state_outside_a_checkout_is_none(tmp_path: Path) -> None:
    assert git_state(tmp_path) is None

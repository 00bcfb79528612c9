"""The trust boundary at a deployed site (issue 15, item 4): the run-config allowlist, redacted
error replies, and approved app bundles (FAB hash pinned in the site config)."""

from __future__ import annotations

import csv
import hashlib
import inspect
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import global_model_state, one_site_run, train_message
from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error

from fedpanfm.config import ExperimentConfig
from sites.approved_app import (
    APPROVED_ENV,
    AppNotApproved,
    app_hash,
    approve_in_site_yaml,
    approved_from_env,
    guard_fab_install,
    verify_app,
)
from sites.client_app import app
from sites.public_errors import SiteFailure
from sites.run_config_allowlist import RunConfigRefused, site_experiment_config
from sites.site_commands import supernode_env
from sites.site_config import load_site_config

NODE = 11
SECRET_SUBJECT = "subj-secret-0042"


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExperimentConfig, dict[str, str], dict[str, str], Path]:
    """A one-site cohort, the run config a coordinator sends (the YAML's text), the site's node config."""
    tmp = tmp_path_factory.mktemp("site_trust")
    cfg, run_config = one_site_run(tmp)
    site_dir = sorted(p for p in Path(cfg.cohort).iterdir() if (p / "manifest.csv").is_file())[0]
    sent = {"config": "experiment.yaml", "overrides": "", "config-yaml": cfg.to_yaml(), "run-folder": "", "resume": ""}
    node = {"site-name": site_dir.name, "data-dir": str(site_dir), "cache-dir": str(tmp / "site_cache")}
    return cfg, sent, node, tmp


# --------------------------------------------------------------------------- (a) the allowlist


def test_the_site_keeps_its_own_paths_and_takes_the_training_keys(deployed) -> None:  # type: ignore[no-untyped-def]
    cfg, sent, node, tmp = deployed
    site_cfg = site_experiment_config(sent, node)
    # The coordinator's own paths never reach the site; the site's cache is its own config's.
    assert site_cfg.cohort == ExperimentConfig().cohort != cfg.cohort
    assert site_cfg.data.cache_dir == str(tmp / "site_cache")
    assert site_cfg.logging == ExperimentConfig().logging and site_cfg.evaluation == ExperimentConfig().evaluation
    # What the federation decides arrives unchanged.
    assert site_cfg.model == cfg.model and site_cfg.train == cfg.train and site_cfg.data.organs == cfg.data.organs
    assert site_cfg.data.batch_size == cfg.data.batch_size and site_cfg.device == "cpu"
    # A resumed run sends its full config dump: keys at their defaults set nothing and pass.
    full = ExperimentConfig().to_yaml()
    assert "cache_dir" in full and "extra" in full
    assert site_experiment_config({**sent, "config-yaml": full}, node).model == ExperimentConfig().model


@pytest.mark.parametrize("override, key", [
    ("'deepspeed.extra={zero_optimization: {offload_param: {device: nvme, nvme_path: /x}}}'",
     "deepspeed.extra.zero_optimization.offload_param.device"),
    ("data.cache_dir=/srv/attacker", "data.cache_dir"),
    ("data.num_workers=64", "data.num_workers"),
    ("data.cache=false", "data.cache"),
])
def test_a_key_outside_the_allowlist_is_refused_by_name(deployed, override: str, key: str) -> None:  # type: ignore[no-untyped-def]
    _, sent, node, _ = deployed
    with pytest.raises(RunConfigRefused, match=rf"run config sets {key} = "):
        site_experiment_config({**sent, "overrides": override}, node)


def test_the_site_reads_no_path_the_coordinator_names(deployed, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, sent, node, _ = deployed
    secret = tmp_path / "secret.yaml"
    secret.write_text("not: [valid")  # were it read, the YAML error would quote it
    with pytest.raises(RunConfigRefused, match="no 'config-yaml'") as info:
        site_experiment_config({**sent, "config": str(secret), "config-yaml": ""}, node)
    assert "valid" not in str(info.value)
    with pytest.raises(RunConfigRefused, match="run config key 'exec' is not accepted"):
        site_experiment_config({**sent, "exec": "rm -rf /"}, node)
    # A simulated partition runs the coordinator's own config on its machine: no boundary.
    cfg = site_experiment_config({"config": "x", "overrides": "", "config-yaml": sent["config-yaml"]},
                                 {"partition-id": 0, "num-partitions": 1})
    assert cfg.cohort == site_experiment_config.__globals__["config_from_run_config"](
        {"config": "x", "overrides": "", "config-yaml": sent["config-yaml"]}).cohort


def test_the_client_app_refuses_and_logs_the_key(deployed, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    cfg, sent, node, _ = deployed
    bad = {**sent, "overrides": "data.cache_dir=/srv/attacker"}
    context = Context(run_id=1, node_id=NODE, node_config=node, state=RecordDict(), run_config=bad)
    with caplog.at_level(logging.ERROR, logger="sites.client_app"), pytest.raises(SiteFailure) as info:
        app(train_message(cfg, global_model_state(cfg), 1, NODE), context)
    assert "train refused at this site: run config sets data.cache_dir" in str(info.value)
    assert any("data.cache_dir" in r.getMessage() and node["site-name"] in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- (b) redacted errors


def _flower_reason(exc: BaseException) -> str:
    # The reason Flower's ClientApp runtime puts in the error reply it sends to the coordinator
    # (flwr/supernode/runtime/run_clientapp.py, Flower 1.41).
    return str(type(exc)) + ":<'" + str(exc) + "'>"


def test_a_site_error_reaches_the_coordinator_without_paths_or_subject_ids(
        deployed, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    from flwr.simulation.ray_transport.ray_actor import VirtualClientEngineActor

    cfg, sent, node, _ = deployed
    broken = tmp_path / "hospital_x"
    shutil.copytree(node["data-dir"], broken)
    rows = list(csv.DictReader(open(broken / "manifest.csv", newline="")))
    first = rows[0]["subject_id"]
    missing = f"img/{SECRET_SUBJECT}_brain.nii.gz"
    for row in rows:
        if row["subject_id"] == first:
            row["subject_id"], row["path"] = SECRET_SUBJECT, missing
    with open(broken / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    context = Context(run_id=1, node_id=NODE, node_config={**node, "data-dir": str(broken)}, state=RecordDict(),
                      run_config=sent)
    msg = train_message(cfg, global_model_state(cfg), 1, NODE)

    class Actor(VirtualClientEngineActor):  # Flower's simulation actor, run in this process
        pass

    with caplog.at_level(logging.ERROR, logger="sites.client_app"):
        with pytest.raises(SiteFailure) as deployed_error:
            app(msg, context)
        with pytest.raises(Exception) as simulated_error:
            Actor().run(lambda: app, msg, "0", context)
    replies = [Message(Error(code=2, reason=_flower_reason(deployed_error.value)), reply_to=msg).error.reason,
               str(simulated_error.value)]
    for reason in replies:
        assert "train failed at this site" in reason and "reference" in reason
        for secret in (SECRET_SUBJECT, str(broken), str(tmp_path), "nii.gz", "manifest.csv", "/"):
            assert secret not in reason, (secret, reason)
    # The full error stays in the site's log, under the reference the coordinator got.
    reference = deployed_error.value.reference
    logged = [r for r in caplog.records if reference in r.getMessage()]
    assert logged and SECRET_SUBJECT in logged[0].getMessage()


# --------------------------------------------------------------------------- (c) approved app bundles


def _app_folder(root: Path, body: str) -> Path:
    app_dir = root / "app"
    (app_dir / "demo").mkdir(parents=True)
    (app_dir / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
        '[project]\nname = "demo"\nversion = "1.0.0"\ndependencies = []\n'
        '[tool.flwr.app]\npublisher = "tester"\n'
        '[tool.flwr.app.components]\nserverapp = "demo.app:server"\nclientapp = "demo.app:client"\n'
        '[tool.flwr.app.config]\n')
    (app_dir / "demo" / "__init__.py").write_text("")
    (app_dir / "demo" / "app.py").write_text(body)
    return app_dir


def test_only_an_approved_app_bundle_is_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr.supernode.runtime.run_clientapp as runtime
    from flwr.cli.build import build_fab_from_disk

    app_dir = _app_folder(tmp_path, "client = None\n")
    fab = build_fab_from_disk(app_dir)
    digest = app_hash(app_dir)
    assert digest == hashlib.sha256(fab).hexdigest() == app_hash(app_dir)  # reproducible: the site can pin it
    (app_dir / "demo" / "app.py").write_text("import os; client = os.system('exfiltrate')\n")
    tampered = build_fab_from_disk(app_dir)
    assert hashlib.sha256(tampered).hexdigest() != digest

    # The guard sits where Flower's ClientApp runtime first uses the FAB, before it loads any code.
    source = inspect.getsource(runtime.run_clientapp)
    assert source.index("install_from_fab(fab.content") < source.index("load_client_app_fn(")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr_home"))
    original = guard_fab_install([digest])
    try:
        with pytest.raises(AppNotApproved, match=f"sha256 {hashlib.sha256(tampered).hexdigest()} is not approved"):
            runtime.install_from_fab(tampered, skip_prompt=True)
        assert not (tmp_path / "flwr_home" / "apps").exists() or not any((tmp_path / "flwr_home" / "apps").iterdir())
        installed = runtime.install_from_fab(fab, skip_prompt=True)
        assert (Path(installed) / "demo" / "app.py").read_text() == "client = None\n"
    finally:
        runtime.install_from_fab = original
    assert verify_app(fab, [digest]) == digest
    with pytest.raises(AppNotApproved):
        verify_app(fab, [])  # nothing approved: nothing runs (fail closed)


def test_site_start_puts_the_checking_clientapp_first(tmp_path: Path) -> None:
    kit = tmp_path / "kit"
    kit.mkdir()
    digest = "ab" * 32
    (kit / "site.yaml").write_text("site_name: hosp_a\ncoordinator: 127.0.0.1:9092\n# keep me\n")
    assert approve_in_site_yaml(kit / "site.yaml", digest, []) == [digest]
    assert approve_in_site_yaml(kit / "site.yaml", digest, load_site_config(kit / "site.yaml").approved_apps) == [digest]
    assert "# keep me" in (kit / "site.yaml").read_text()
    site = load_site_config(kit / "site.yaml")
    env = supernode_env(site)
    shim = shutil.which("flwr-clientapp", path=env["PATH"])
    assert shim == str(Path(site.worker.state_dir) / "bin" / "flwr-clientapp")
    assert approved_from_env(env) == [digest]
    # The shim runs Flower's own flwr-clientapp (here: its --help) under the site's Python.
    out = subprocess.run([shim, "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and "--runtime-api-address" in out.stdout
    # Nothing approved: the checking shim is still first and refuses every FAB (fail closed);
    # only the development opt-out leaves Flower's own flwr-clientapp in place.
    (kit / "plain.yaml").write_text("site_name: hosp_a\ncoordinator: 127.0.0.1:9092\n")
    plain = supernode_env(load_site_config(kit / "plain.yaml"))
    assert shutil.which("flwr-clientapp", path=plain["PATH"]) == shim and approved_from_env(plain) == []
    (kit / "dev.yaml").write_text("site_name: hosp_a\ncoordinator: 127.0.0.1:9092\nallow_any_app: true\n")
    dev = supernode_env(load_site_config(kit / "dev.yaml"))
    assert APPROVED_ENV not in dev and shutil.which("flwr-clientapp", path=dev["PATH"]) != shim
    (kit / "bad.yaml").write_text("site_name: hosp_a\ncoordinator: 127.0.0.1:9092\napproved_apps: [abc]\n")
    with pytest.raises(ValueError, match=r"approved_apps\[0\]: 'abc' is not a SHA-256"):
        load_site_config(kit / "bad.yaml")
    assert os.access(shim, os.X_OK) and sys.executable in Path(shim).read_text()


@pytest.mark.parametrize("name", ["x/../y", "abc\n", "", "a" * 64, "../etc"])
def test_a_site_name_entering_through_the_node_config_is_checked(deployed, name: str) -> None:  # type: ignore[no-untyped-def]
    from sites.runtime import SiteConfigError, resolve_site

    cfg, _, node, _ = deployed
    with pytest.raises(SiteConfigError, match="node config site-name: .* is not a valid site name"):
        resolve_site({**node, "site-name": name}, cfg)


def test_a_site_that_approved_no_app_does_not_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Deny by default: `site check` fails and `site start` refuses (before reading data or starting
    anything) until the site pins an app, naming the file, the key and the command that approves."""
    from fedpanfm.cli import main
    from sites.site_commands import run_check

    kit = tmp_path / "kit"
    kit.mkdir()
    path = kit / "site.yaml"
    path.write_text("site_name: hosp_a\ncoordinator: 127.0.0.1:9092\ndata_dir: nowhere\n")
    expected = (rf"{path}: approved_apps is empty: this site approves no app, so it does not start\. .*"
                rf"`fedpanfm site approve-app --site-config {path} --write`.*allow_any_app: true")
    failures = run_check(load_site_config(path), offline=True)
    assert [f.split(":")[0] for f in failures] == ["data", "keys", "app approval"]
    assert re.search(expected, failures[2]) and "[FAIL] app approval" in capsys.readouterr().out
    assert main(["site", "start", "--site-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert re.search(expected, err) and "manifest.csv" not in err  # refused before the data was read
    assert not (kit / "logs").exists() and not (kit / "state").exists()  # nothing was started

    # Development opt-out: a warning, no failure for the approval.
    path.write_text(path.read_text() + "allow_any_app: true\n")
    assert [f.split(":")[0] for f in run_check(load_site_config(path), offline=True)] == ["data", "keys"]
    assert "[warn] app approval: allow_any_app: true: any app the coordinator sends runs here" in capsys.readouterr().out
    # Approving an app ends development mode (both set would contradict each other).
    (kit / "both.yaml").write_text(path.read_text() + f"approved_apps: [{'cd' * 32}]\n")
    with pytest.raises(ValueError, match="both.yaml: allow_any_app: true and approved_apps contradict"):
        load_site_config(kit / "both.yaml")
    assert approve_in_site_yaml(path, "cd" * 32, []) == ["cd" * 32]
    site = load_site_config(path)
    assert not site.allow_any_app and site.app_approval().startswith("only app bundles with SHA-256 cdcdcdcdcdcd...")

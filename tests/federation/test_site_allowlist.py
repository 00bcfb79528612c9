"""What the coordinator may set at a site (fedpanfm/federation/site_allowlist.py): one definition
that every deployed site enforces and the coordinator checks before it submits a run."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

import pytest
import tomllib
import yaml
from conftest import TINY, tiny_config

from fedpanfm.config import ConfigError, ExperimentConfig
from fedpanfm.federation.site_allowlist import (
    RUN_CONFIG_KEYS,
    SITE_SETTABLE,
    check_sites_accept,
    refused_settings,
    site_view,
)

ROOT = Path(__file__).resolve().parents[2]
#: Keys a site refuses (paths, caches, local processes, DeepSpeed passthrough) and keys it takes.
REFUSED = ["data.num_workers=3", "data.cache_dir=/srv/x", "deepspeed.extra={offload: nvme}"]
TAKEN = ["train.lr=0.01", "federation.rounds=7", "deepspeed.zero_stage=1", "data.batch_size=2",
         "logging.run_dir=/coordinator/runs", "cohort=/coordinator/cohort", "name=other"]


def test_refused_settings_lists_only_what_a_site_decides_itself() -> None:
    assert refused_settings(ExperimentConfig()) == [] and refused_settings(tiny_config(TAKEN)) == []
    refused = refused_settings(tiny_config([*TAKEN, *REFUSED]))
    assert refused == [("data.cache_dir", "/srv/x"), ("data.num_workers", 3), ("deepspeed.extra.offload", "nvme")]
    # The coordinator's own sections reach a site at their defaults; the federation's arrive as sent.
    view = site_view(tiny_config(TAKEN))
    default = ExperimentConfig().to_dict()
    assert (view["logging"], view["cohort"], view["name"]) == (default["logging"], default["cohort"], default["name"])
    assert view["train"]["lr"] == 0.01 and view["federation"]["rounds"] == 7


def test_every_site_enforces_the_same_definition(tmp_path: Path) -> None:
    """The site's check (sites/run_config_allowlist.py) refuses exactly what the coordinator's
    pre-check refuses, key by key, with the same wording."""
    from sites.run_config_allowlist import RunConfigRefused, site_experiment_config

    site = tmp_path / "hospital"
    site.mkdir()
    node = {"site-name": "hospital", "data-dir": str(site)}
    sent = {"config": "exp.yaml", "overrides": "", "config-yaml": yaml.safe_dump(TINY), "run-folder": "", "resume": ""}
    for override in TAKEN:
        site_experiment_config({**sent, "overrides": shlex.quote(override)}, node)
        check_sites_accept(tiny_config([override]), "exp.yaml")
    for override in REFUSED:
        key = override.split("=")[0]
        with pytest.raises(RunConfigRefused, match=rf"^run config sets {key}") as at_site:
            site_experiment_config({**sent, "overrides": shlex.quote(override)}, node)
        with pytest.raises(ConfigError, match=rf"^exp.yaml: sets {key}") as at_coordinator:
            check_sites_accept(tiny_config([override]), "exp.yaml")
        assert str(at_site.value).removeprefix("run config ") in str(at_coordinator.value)
    # Every run-config key the app declares (what `flwr run` sends) is one a site accepts.
    app_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(app_config) == RUN_CONFIG_KEYS


def test_federation_run_refuses_an_experiment_no_site_accepts_before_submitting(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedpanfm.cli import main
    from orchestration.deploy_commands import write_run_config

    experiment = tmp_path / "exp.yaml"
    experiment.write_text(yaml.safe_dump({**TINY, "data": {**TINY["data"], "num_workers": 2}}))
    deployment = tmp_path / "deployment.yaml"
    deployment.write_text(yaml.safe_dump({"sites": {"a": ""}, "experiment": str(experiment)}))
    run = tmp_path / "run"
    assert main(["federation", "run", "--coordinator-config", str(deployment), "--run-folder", str(run),
                 "--flwr-home", str(tmp_path / "flwr")]) == 2
    err = capsys.readouterr().err
    assert f"{experiment}: sets data.num_workers = 2, which only the site's own config decides" in err
    assert "every deployed site would refuse this experiment" in err
    assert not run.exists() and not (tmp_path / "flwr").exists()  # nothing written, nothing submitted
    # --set is checked the same way; so is a run config written by other callers.
    experiment.write_text(yaml.safe_dump(TINY))
    assert main(["federation", "run", "--coordinator-config", str(deployment), "--run-folder", str(run),
                 "--set", "data.memory_cache_mib=0"]) == 2
    assert "sets data.memory_cache_mib = 0.0" in capsys.readouterr().err and not run.exists()
    with pytest.raises(ConfigError, match="sets data.cache_dir = '/x'"):
        write_run_config(tmp_path / "rc.toml", experiment, ["data.cache_dir=/x"], run)
    written = tomllib.loads(write_run_config(tmp_path / "rc.toml", experiment, ["train.lr=0.5"], run).read_text())
    assert set(written) <= RUN_CONFIG_KEYS


def test_simulate_warns_that_deployed_sites_would_refuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Simulated sites take the config as it is (no trust boundary on one machine), so simulate
    runs it, but says at once which key a deployment would be refused for."""
    import fedpanfm.run_folder
    from orchestration.simulate import simulate

    class Stop(Exception):
        pass

    def stop(*args: object, **kwargs: object) -> Path:
        raise Stop  # the warning is given before the run folder is made: stop there

    monkeypatch.setattr(fedpanfm.run_folder, "new_run_folder", stop)
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(yaml.safe_dump(TINY))
    with caplog.at_level(logging.WARNING, logger="orchestration.simulate"), pytest.raises(Stop):
        simulate(experiment, ["data.num_workers=2"])
    assert [r.getMessage() for r in caplog.records] == [
        f"{experiment}: simulated sites use it as it is, but every deployed site would refuse it: sets "
        f"data.num_workers = 2, which only the site's own config decides (paths, caches, DeepSpeed passthrough, "
        f"local processes); the coordinator may set: {', '.join(SITE_SETTABLE)}"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="orchestration.simulate"), pytest.raises(Stop):
        simulate(experiment, ["train.lr=0.5"])
    assert not caplog.records


def test_server_app_refuses_a_run_config_no_site_accepts(tmp_path: Path) -> None:
    """A raw `flwr run` skips `federation run`'s check: the deployed ServerApp makes it before
    anything is written (a simulation's in-memory Grid is exempt, as in simulate)."""
    from flower_fakes import FakeGrid

    from orchestration.server_app import run_federation

    experiment = tmp_path / "exp.yaml"
    experiment.write_text(yaml.safe_dump(TINY))
    run = tmp_path / "run"
    run_config = {"config": str(experiment), "overrides": shlex.join(["data.cache_dir=/srv/x"]),
                  "run-folder": str(run), "config-yaml": experiment.read_text()}
    with pytest.raises(ConfigError, match="the run config: sets data.cache_dir = '/srv/x'"):
        run_federation(FakeGrid([1, 2]), run_config)  # type: ignore[arg-type]
    assert not run.exists()

"""Site kit and coordinator configs: loading, checks, the Flower command lines and files they make."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib
import yaml
from conftest import TINY, make_site, tiny_config

from fedpanfm.certs import init_certs
from fedpanfm.config import ConfigError, config_from_run_config
from orchestration.coordinator import load_coordinator_config, superlink_command, write_flower_connection
from orchestration.deploy_commands import write_run_config
from sites.site_commands import check_data, run_check, supernode_command, supernode_env
from sites.site_config import load_site_config


@pytest.fixture
def kit(tmp_path: Path) -> Path:
    """A site kit folder: site.yaml, experiment.yaml, keys, and a 3-subject NIfTI site."""
    certs = init_certs(tmp_path / "certs", "127.0.0.1", ["hosp_a"])
    folder = tmp_path / "kit"
    folder.mkdir()
    for name in ("auth.key", "ca.crt"):
        (folder / name).write_bytes((certs.site_dir("hosp_a") / name).read_bytes())
    (folder / "auth.key").chmod(0o600)
    (folder / "experiment.yaml").write_text(yaml.safe_dump(TINY))
    make_site(folder / "data", tiny_config(), {"s0": ["heart", "liver"], "s1": ["heart"], "s2": ["liver"]})
    (folder / "site.yaml").write_text(yaml.safe_dump({
        "site_name": "hosp_a", "data_dir": "data", "organs": ["heart", "liver"],
        "experiment": "experiment.yaml", "coordinator": "127.0.0.1:1", "resources": {"cpus": 2},
        "approved_apps": ["ab" * 32],
    }))
    return folder


def test_site_config_paths_and_node_config(kit: Path) -> None:
    from flwr.common.config import parse_config_args

    from sites.runtime import resolve_site

    site = load_site_config(kit / "site.yaml")
    assert site.data_dir == str(kit.resolve() / "data") and site.auth_key == str(kit.resolve() / "auth.key")
    # Flower parses the node config string; the ClientApp's resolver accepts what comes out.
    node_config = parse_config_args([site.node_config()])
    # The site's own decisions, at their defaults: statistics shared, no floor of its own.
    assert node_config == {"site-name": "hosp_a", "data-dir": site.data_dir, "cohort-statistics": "on",
                           "statistics-min-cell": 0}
    assert resolve_site(node_config, tiny_config()) == ("hosp_a", Path(site.data_dir))


def test_node_config_carries_what_the_site_decides(kit: Path) -> None:
    """site.yaml's statistics, per-step curve and device fields reach the node config under the
    keys the ClientApp and the trainer worker read, and those readers act on them."""
    from flwr.app import Context, RecordDict
    from flwr.common.config import parse_config_args

    from sites.cohort_statistics import StatisticsDeclined, answer_statistics, release_threshold
    from sites.multi_device import site_devices
    from sites.run_config_allowlist import site_experiment_config
    from sites.step_curves import curves_root

    cfg = tiny_config()  # data.batch_size 4: two devices take 2 subjects each
    default = parse_config_args([load_site_config(kit / "site.yaml").node_config()])
    assert release_threshold({}, default, 5) == 5 and curves_root(default) is None
    assert site_devices(cfg, default) == cfg.train.devices_per_site == 1

    raw = yaml.safe_load((kit / "site.yaml").read_text())
    (kit / "own.yaml").write_text(yaml.safe_dump({
        **raw, "statistics": {"share": False, "min_cell": 12}, "tensorboard_dir": "curves",
        "resources": {"cpus": 2, "train_devices": 2}, "memory_cache_mib": 64}))
    site = load_site_config(kit / "own.yaml")
    node_config = parse_config_args([site.node_config(worker=True)])
    assert node_config["statistics-min-cell"] == 12 and node_config["train-devices"] == 2
    # The site's RAM budget is what its trainer uses, whatever the coordinator's experiment says.
    sent = {"config": "e.yaml", "overrides": "", "config-yaml": cfg.to_yaml(), "run-folder": "", "resume": ""}
    assert site_experiment_config(sent, node_config).data.memory_cache_mib == 64.0
    assert site_experiment_config(sent, default).data.memory_cache_mib == cfg.data.memory_cache_mib == 512.0
    assert release_threshold({"min-cell": 6}, node_config, 5) == 12  # the server may ask more, never less
    assert curves_root(node_config) == kit.resolve() / "curves"  # relative to the kit folder
    assert site_devices(cfg, node_config) == 2
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    with pytest.raises(StatisticsDeclined, match="cohort-statistics='off'"):
        answer_statistics(None, context, cfg)  # type: ignore[arg-type]  # declined before the message is read

    for change, match in (({"tensorboard_dir": "it's"}, "tensorboard_dir .* must not contain a single quote"),
                          ({"resources": {"train_devices": -1}}, "train_devices = -1 is below the minimum 0"),
                          ({"statistics": {"min_cell": -1}}, "min_cell = -1 is below the minimum 0"),
                          ({"memory_cache_mib": -1}, "memory_cache_mib = -1.0 is below the minimum 0"),
                          ({"statistics": {"share": "maybe"}}, "statistics.share")):
        (kit / "bad.yaml").write_text(yaml.safe_dump({**raw, **change}))
        with pytest.raises(ConfigError, match=match):
            load_site_config(kit / "bad.yaml")


def test_site_config_errors_name_file_and_key(kit: Path) -> None:
    raw = yaml.safe_load((kit / "site.yaml").read_text())
    for change, match in (({"colour": 1}, "bad.yaml: unknown key 'colour'"),
                          ({"coordinator": "nohostport"}, "bad.yaml: coordinator: 'nohostport' is not HOST:PORT"),
                          ({"site_name": "a b"}, "bad.yaml: site_name: 'a b' is not a valid site name"),
                          ({"clientapp_port": 0}, "clientapp_port = 0 is below the minimum 1")):
        bad = kit / "bad.yaml"
        bad.write_text(yaml.safe_dump({**raw, **change}))
        with pytest.raises(ConfigError, match=match):
            load_site_config(bad)


def test_check_data_and_organs(kit: Path) -> None:
    site = load_site_config(kit / "site.yaml")
    table = check_data(site)
    assert "hosp_a" in table or "data" in table
    site.organs = ["heart", "brain"]
    with pytest.raises(ValueError, match=r"extra in data: \['liver'\], missing from data: \['brain'\]"):
        check_data(site)


def test_run_check_reports_each_failure(kit: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = load_site_config(kit / "site.yaml")
    assert run_check(site, offline=True) == []
    (kit / "auth.key").unlink()
    failures = run_check(site, timeout_s=1.0)
    assert [f.split(":")[0] for f in failures] == ["keys", "coordinator"]
    assert "auth.key: private key file not found" in failures[0]
    assert "[ok]   data" in capsys.readouterr().out


def test_supernode_command_and_env(kit: Path) -> None:
    site = load_site_config(kit / "site.yaml")
    cmd = supernode_command(site)
    assert cmd[cmd.index("--superlink") + 1] == "127.0.0.1:1"
    assert cmd[cmd.index("--root-certificates") + 1] == site.ca_cert
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == site.auth_key
    assert "--insecure" not in cmd and "--allow-runtime-dependency-installation" not in cmd
    insecure = supernode_command(site, insecure=True)
    assert "--insecure" in insecure and "--auth-supernode-private-key" not in insecure
    env = supernode_env(site)
    assert env["OMP_NUM_THREADS"] == "2" and env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"


def test_coordinator_config_and_superlink_command(tmp_path: Path) -> None:
    init_certs(tmp_path / "certs", "127.0.0.1", ["a", "b"])
    (tmp_path / "deployment.yaml").write_text(yaml.safe_dump({"sites": {"a": "", "b": ""}, "port": 9555}))
    cfg = load_coordinator_config(tmp_path / "deployment.yaml")
    assert cfg.site_keys()["b"] == tmp_path.resolve() / "certs" / "sites" / "b" / "auth.pub"
    cmd = superlink_command(cfg)
    assert cmd[cmd.index("--database") + 1] == str(tmp_path.resolve() / "deploy" / "state.db")
    assert cmd[cmd.index("--ssl-certfile") + 1].endswith("server.crt")
    assert "--enable-supernode-auth" in cmd and "--disable-runtime-dependency-installation" in cmd
    insecure = superlink_command(cfg, insecure=True)
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure
    (tmp_path / "none.yaml").write_text(yaml.safe_dump({"port": 9555}))
    with pytest.raises(ConfigError, match="none.yaml: sites: name at least one site"):
        load_coordinator_config(tmp_path / "none.yaml")


def test_flower_connection_is_what_flwr_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.cli.flower_config import read_superlink_connection

    ca = init_certs(tmp_path / "certs", "127.0.0.1", ["a"]).ca_cert
    path = write_flower_connection(tmp_path / "home", "fedpanfm", "127.0.0.1:9555", ca)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    conn = read_superlink_connection(None)  # the default connection
    assert (conn.name, conn.address, conn.root_certificates) == ("fedpanfm", "127.0.0.1:9555", str(ca.resolve()))
    assert not conn.insecure and path.is_file()


def test_run_config_carries_the_experiment(tmp_path: Path) -> None:
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump(TINY))
    path = write_run_config(tmp_path / "rc.toml", exp, ["federation.rounds=2", "name=x y"], tmp_path / "run")
    run_config = tomllib.loads(path.read_text())
    assert set(run_config) == {"config", "overrides", "run-folder", "config-yaml"}
    exp.unlink()  # the site has no such file: the config must come from the run config alone
    cfg = config_from_run_config(run_config)
    assert cfg.federation.rounds == 2 and cfg.name == "x y" and cfg.model.dim == TINY["model"]["dim"]
    # Keys flwr run may override must exist in [tool.flwr.app.config].
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert set(run_config) <= set(pyproject["tool"]["flwr"]["app"]["config"])
    exp.write_text(yaml.safe_dump(TINY))
    with pytest.raises(ConfigError, match="federation.nope"):  # checked before anything is submitted
        write_run_config(tmp_path / "rc2.toml", exp, ["federation.nope=1"], tmp_path / "run")

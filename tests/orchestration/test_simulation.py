"""End to end: a 2-round, 3-site federation in Flower's simulation runtime, read back from disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedpanfm.checkpoint import load_checkpoint
from fedpanfm.config import ConfigError, config_from_run_config, load_config
from fedpanfm.tb import read_scalars, site_run_name
from orchestration.checkpoints import CheckpointPolicy
from orchestration.server_app import initial_state
from orchestration.simulate import simulate

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_three_site_simulation_logs_and_checkpoints(tmp_path: Path) -> None:
    overrides = [
        f"cohort={tmp_path / 'cohort'}", f"logging.run_dir={tmp_path / 'runs'}",
        "synth.sites=3", "synth.subjects=6", "federation.rounds=2", "federation.min_sites=3",
        "data.val_fraction=0.34", "data.batch_size=3",
        # The server probes the global teacher on a labelled cohort each round (here the sites' own).
        f"evaluation.server_cohort={tmp_path / 'cohort'}", "evaluation.server_probe_every_round=true",
    ]
    config = ROOT / "configs" / "quickstart.yaml"
    cfg = load_config(config, overrides)
    summary = simulate(config, overrides, cpus=2)

    run = Path(summary["run_folder"])
    assert run.parent == tmp_path / "runs" and run.name.startswith(f"{cfg.name}-")
    assert summary["rounds"] == 2 and len(summary["sites"]) == 3
    # every site's optimiser steps over both rounds, as its TensorBoard sub-run records them per round
    assert set(summary["site_steps"]) == set(summary["sites"])
    assert (run / "config.yaml").is_file()

    server = read_scalars(run / "tensorboard" / "server")
    organs = cfg.data.organ_set().names
    # Costs of the run are grouped under system/ (fedpanfm/tb.py), apart from the science.
    expected = {"train/loss", "val/loss", "system/time/round_s", "system/bytes/received", "system/bytes/sent_total",
                "director_divergence/mean", "expert_usage/layer0/e0", "sites",
                *(f"saliency/{o}" for o in organs)}
    assert expected <= set(server), sorted(expected - set(server))
    # Where each round went: the server's spans and the sites' (mean over sites), per round.
    expected |= {f"system/time/server/{n}_s"
                 for n in ("decode", "aggregate", "report", "encode", "tensorboard", "checkpoint_submit")}
    expected |= {f"system/train/time/{n}_s" for n in ("decode", "load", "fit_call", "export", "encode")}
    for tag in expected:
        assert [step for step, _ in server[tag]] == [1, 2], tag
    assert all(v >= 0 for n in expected if n.startswith(("system/time/server/", "system/train/time/")) for _, v in server[n])
    # The server-side probe ran on the initial weights (round 0) and after every round without
    # holding the federation up.
    assert [step for step, _ in server["probe/n_test"]] == [0, 1, 2]
    assert all(v > 0 for _, v in server["probe/n_test"])
    # Every site contributed in every round.
    assert [v for _, v in server["sites"]] == [3.0, 3.0]
    shares = [server[f"saliency/{o}"][-1][1] for o in organs]
    assert sum(shares) == pytest.approx(1.0, abs=1e-5)

    site_runs = sorted(p.name for p in (run / "tensorboard").iterdir() if p.name.startswith("site_"))
    assert site_runs == sorted(site_run_name(s) for s in summary["sites"])
    site_tags = [read_scalars(run / "tensorboard" / name) for name in site_runs]
    for site in summary["sites"]:
        per_round = read_scalars(run / "tensorboard" / site_run_name(site))["train/steps"]
        assert summary["site_steps"][site] == sum(v for _, v in per_round) > 0
    for tags in site_tags:
        assert [step for step, _ in tags["train/loss"]] == [1, 2]
        assert [step for step, _ in tags["val/loss"]] == [1, 2]
    # Same tag names across sites (curves overlay); per-organ mask rates only for organs a site
    # holds (no value is invented for a missing organ), all under names the server uses too.
    per_site = [{k for k in t if not k.startswith("train/mask_rate/")} for t in site_tags]
    assert all(tags == per_site[0] for tags in per_site)
    assert set().union(*site_tags) - {"train/steps", "train/subjects"} <= set(server)
    # The server's val loss is the subject-weighted mean of the sites' (equal held-out sizes here).
    mean_site_val = sum(t["val/loss"][-1][1] for t in site_tags) / 3
    assert server["val/loss"][-1][1] == pytest.approx(mean_site_val, rel=1e-5)

    ckpt = run / "checkpoints"
    assert (ckpt / "round_1").is_dir() and (ckpt / "round_2").is_dir()
    state, cfg_dict, meta = load_checkpoint(ckpt / "latest")
    assert meta["round"] == 2 and cfg_dict["name"] == cfg.name
    assert set(state) == set(initial_state(cfg))
    _, _, best_meta = load_checkpoint(ckpt / "best")
    assert best_meta["round"] == summary["best_round"]
    assert best_meta["val_loss"] == pytest.approx(min(v for _, v in server["val/loss"]))


def test_checkpoint_policy_keeps_best_and_latest(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs" / "quickstart.yaml")
    policy = CheckpointPolicy(tmp_path / "checkpoints", cfg)
    for k, loss in enumerate([3.0, 2.0, 4.0, None], start=1):
        policy.submit(k, {"w": torch.full((2,), float(k))}, loss, {"sites": ["a"]})
    policy.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "best", "latest", "round_1", "round_2", "round_3", "round_4"]
    state, _, meta = load_checkpoint(tmp_path / "checkpoints" / "best")
    assert meta["round"] == 2 and meta["val_loss"] == 2.0 and torch.equal(state["w"], torch.full((2,), 2.0))
    _, _, meta = load_checkpoint(tmp_path / "checkpoints" / "latest")
    assert meta["round"] == 4 and meta["val_loss"] is None


def test_run_config_must_name_config_and_overrides() -> None:
    with pytest.raises(ConfigError, match="missing key.*overrides"):
        config_from_run_config({"config": "configs/quickstart.yaml"})
    cfg = config_from_run_config({"config": str(ROOT / "configs" / "quickstart.yaml"),
                                  "overrides": "federation.rounds=5 name='a b'"})
    assert cfg.federation.rounds == 5 and cfg.name == "a b"

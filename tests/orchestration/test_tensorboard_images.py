"""TensorBoard for people: per-round pictures, per-site update-norm histograms, hparams with the
final metrics, the probe AUROC from round 0, costs grouped under system/, a custom-scalars layout
with per-step charts that overlay the sites' step curves; all read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import global_model_state, make_site, tiny_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from fedpanfm import tb_figures
from fedpanfm.federation.tensor_codec import state_to_arrayrecord
from fedpanfm.tb import grouped_tag
from fedpanfm.train.schedules import Schedules
from orchestration.server_app import RunRecorder
from orchestration.strategy import RoundReport
from sites.step_curves import step_curves


def _acc(path: Path) -> EventAccumulator:
    acc = EventAccumulator(str(path), size_guidance={"images": 0, "scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_system_tags_are_grouped_and_science_is_not() -> None:
    assert grouped_tag("time/round_s") == "system/time/round_s"
    assert grouped_tag("train/time/fit_s") == "system/train/time/fit_s"
    assert grouped_tag("bytes/received") == "system/bytes/received"
    assert grouped_tag("memory/rss_mb") == "system/memory/rss_mb"
    assert grouped_tag("attempts") == "system/attempts"
    assert grouped_tag("system/time/x") == "system/time/x"
    for science in ("train/loss", "probe/auroc_macro", "saliency/heart", "expert_usage/layer0/e1", "timeline/x"):
        assert grouped_tag(science) == science


def test_expert_usage_matrix_is_layer_by_expert() -> None:
    m = tb_figures.expert_usage_matrix({"expert_usage/layer0/e0": 0.7, "expert_usage/layer0/e1": 0.3,
                                        "expert_usage/layer1/e1": 1.0, "train/loss": 2.0})
    assert m.shape == (2, 2) and m[0].tolist() == [0.7, 0.3] and np.isnan(m[1, 0]) and m[1, 1] == 1.0
    with pytest.raises(ValueError, match="no expert_usage"):
        tb_figures.expert_usage_matrix({"train/loss": 1.0})


@pytest.mark.timeout(300)
def test_recorder_writes_pictures_histograms_hparams_and_auroc(tmp_path: Path) -> None:
    organs = ["heart", "liver", "kidney"]
    cohort = tmp_path / "probe"
    make_site(cohort / "site_a", tiny_config(), {f"a{k:02d}": organs for k in range(20)}, seed=1)
    cfg = tiny_config([f"evaluation.server_cohort={cohort}", "evaluation.server_probe_every_round=true"])
    names = cfg.data.organ_set().names
    state = global_model_state(cfg)
    grid = SimpleNamespace(bytes_sent=0, bytes_received=0)
    saliency = torch.full((len(names),), 1.0 / len(names), dtype=torch.float64)
    rec = RunRecorder(tmp_path / "run", cfg, grid, global_state=lambda: state, saliency=lambda: saliency)
    rec.after_round(0, state_to_arrayrecord(state))  # round 0: the initial weights are probed
    metrics = {**{f"saliency/{o}": 1.0 / len(names) for o in names},
               **{f"train/mask_rate/{o}": 0.3 for o in organs},
               **{f"expert_usage/layer{l}/e{e}": 0.25 for l in range(2) for e in range(4)}, "train/loss": 2.5}
    for r in (1, 2):
        grid.bytes_sent += 1000
        rec.on_round(RoundReport(server_round=r, metrics=metrics, site_metrics={"a": {"loss": 2.5}},
                                 update_norms={"a": [0.1, 0.5, 0.2]}))
        rec.after_round(r, state_to_arrayrecord(state))
    summary = rec.finish()

    server = _acc(Path(summary["tensorboard"]) / "server")
    tags = server.Tags()
    assert {"organs/saliency_and_mask_rate", "experts/usage", "masks/student_view"} <= set(tags["images"])
    for tag in ("organs/saliency_and_mask_rate", "experts/usage", "masks/student_view"):
        assert [e.step for e in server.Images(tag)] == [1, 2], tag
        assert server.Images(tag)[0].width >= 300
    assert [e.step for e in server.Scalars("probe/auroc_macro")] == [0, 1, 2]
    assert "system/time/round_s" in tags["scalars"] and "time/round_s" not in tags["scalars"]
    hparams = server.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hparams)
    assert "final/probe_auroc_macro" in tags["scalars"] and "final/train/loss" in tags["scalars"]
    assert "custom_scalars__config__" in server.PluginTagToContent("custom_scalars")
    site = _acc(Path(summary["tensorboard"]) / "site_a")

    # The layout read back: science first, system last, and per-step charts whose tag regexes
    # match the site's per-step curves (the real step writer fed what LocalTrainer.fit passes
    # on_step) and nothing in the per-round sub-runs, so each chart overlays the sites' steps.
    (config,) = server.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    titles = [c.title for c in layout.category]
    assert titles[0] == "1 progress" and titles[-1].endswith("system")
    (per_step,) = [c for c in layout.category if "per step" in c.title]
    step_values = {"loss": 2.0, "loss/dino": 1.2, "loss/ibot": 0.8, "mask/token_ratio": 0.4,
                   **{f"schedule/{k}": v for k, v in Schedules.for_config(cfg, total_steps=10).at(3).items()}}
    with step_curves({"site-name": "a", "tensorboard-dir": summary["tensorboard"]}, "a", cfg) as on_step:
        assert on_step is not None
        on_step(3, step_values)
    step_tags = set(_acc(Path(summary["tensorboard"]) / "site_a" / "steps").Tags()["scalars"])
    round_tags = set(tags["scalars"]) | set(site.Tags()["scalars"])
    charts = {chart.title: list(chart.multiline.tag) for chart in per_step.chart}
    assert {"loss per step", "learning rate per step"} <= set(charts)
    for title, regexes in charts.items():
        assert any(re.match(r, t) for r in regexes for t in step_tags), title
        assert not any(re.match(r, t) for r in regexes for t in round_tags), title
    assert [t for t in step_tags if re.match(charts["loss per step"][0], t)] == ["loss/total"]
    (hist,) = site.Histograms("update/norm_per_tensor")[:1]
    assert hist.step == 1 and hist.histogram_value.num == 3
    assert hist.histogram_value.sum == pytest.approx(0.8)
    assert set(json.loads((tmp_path / "run" / "summary.json").read_text())["probe_auroc"]) <= {"0", "1", "2"}

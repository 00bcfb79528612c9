"""The site ClientApp called directly with hand-built Flower messages on a tiny synthetic site."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
import torch
from conftest import one_site_run, site_message, train_message
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from fedpanfm.config import ExperimentConfig
from fedpanfm.federation.protocol import SiteUpdate
from fedpanfm.model.meta_arch import PanFMSSL
from sites.client_app import app
from sites.runtime import STATE_CONFIG, SiteConfigError, SiteRuntime, resolve_site, site_seed

NODE = 7


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExperimentConfig, dict[str, str], Path]:
    """A one-site tiny cohort and the run config that names it."""
    tmp = tmp_path_factory.mktemp("client_app")
    cfg, run_config = one_site_run(tmp)
    return cfg, run_config, tmp


def _manifest_organs(site_dir: Path, subjects: list[str]) -> dict[str, int]:
    """Subjects per organ among ``subjects``, read straight from the manifest."""
    holders: dict[str, set[str]] = {}
    with open(site_dir / "manifest.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row["subject_id"] in subjects:
                holders.setdefault(row["organ"], set()).add(row["subject_id"])
    return {o: len(s) for o, s in holders.items()}


def test_train_reply_state_and_evaluate(site: tuple[ExperimentConfig, dict[str, str], Path]) -> None:
    cfg, run_config, _ = site
    organs = cfg.data.organ_set()
    context = Context(run_id=1, node_id=NODE, node_config={"partition-id": 0, "num-partitions": 1},
                      state=RecordDict(), run_config=run_config)
    torch.manual_seed(0)
    global_state = {k: v.detach().float().clone() for k, v in PanFMSSL(cfg).state_dict().items()}

    t0 = time.perf_counter()
    reply = app(train_message(cfg, global_state, 1, NODE), context)
    wall = time.perf_counter() - t0
    assert not reply.has_error(), reply.error
    update = SiteUpdate.from_recorddict(reply.content, organs.names)
    # Where the call went: consecutive spans, none negative, together within the call's wall
    # time, the training span covering the trainer's own fit time.
    spans = {k: v for k, v in update.metrics.items() if k.startswith("time/") and k != "time/fit_s"}
    assert set(spans) == {f"time/{n}_s" for n in ("decode", "site", "load", "fit_call", "export", "keep", "select", "encode")}
    assert all(v >= 0 for v in spans.values()) and sum(spans.values()) <= wall
    assert spans["time/fit_call_s"] >= update.metrics["time/fit_s"] > 0

    runtime = SiteRuntime.from_context(context, cfg)
    assert update.site == runtime.name
    assert update.num_examples == len(runtime.train_ids)
    expected = _manifest_organs(runtime.site_dir, runtime.train_ids)
    assert {o: int(update.organ_subjects[organs.index(o)]) for o in expected} == expected
    assert all(update.organ_subjects[organs.index(o)] == 0 for o in organs if o not in expected)
    assert tuple(update.gate_mass.shape) == (cfg.model.depth, cfg.model.dex.experts)
    assert update.gate_mass.sum() > 0
    assert update.steps == -(-len(runtime.train_ids) // cfg.data.batch_size) * cfg.train.epochs
    # Only what the server reads comes back: no teacher under the default server_ema policy.
    from fedpanfm.federation.validation import required_keys
    assert set(update.state) == set(required_keys(global_state, cfg))
    assert not any(k.startswith("teacher.") for k in update.state)
    changed = [k for k in global_state if k.startswith("student.") and not torch.equal(update.state[k], global_state[k])]
    assert changed, "local training changed no student weight"

    # The site's schedule position is kept in context.state and continues in the next round.
    step1 = json.loads(context.state[STATE_CONFIG]["schedule"])["step"]
    assert step1 == update.steps
    reply2 = app(train_message(cfg, {**global_state, **update.state}, 2, NODE), context)
    update2 = SiteUpdate.from_recorddict(reply2.content, organs.names)
    step2 = json.loads(context.state[STATE_CONFIG]["schedule"])["step"]
    assert step2 == step1 + update2.steps > step1

    # Validation: the held-out subjects, the same loss for the same weights.
    eval_msg = site_message(RecordDict({"arrays": ArrayRecord({**global_state, **update2.state}), "config": ConfigRecord()}),
                        "evaluate", 2, NODE)
    metrics = [app(eval_msg, context).content["metrics"] for _ in range(2)]
    assert metrics[0]["num-examples"] == len(runtime.val_ids) > 0
    assert metrics[0]["val/loss"] == pytest.approx(metrics[1]["val/loss"])
    assert torch.isfinite(torch.tensor(metrics[0]["val/loss"]))


def test_site_resolution_errors_name_the_cause(site: tuple[ExperimentConfig, dict[str, str], Path]) -> None:
    cfg, _, tmp = site
    with pytest.raises(SiteConfigError, match=r"partition-id=3.*has 1 site"):
        resolve_site({"partition-id": 3}, cfg)
    with pytest.raises(SiteConfigError, match="data-dir"):
        resolve_site({"site-name": "a"}, cfg)
    with pytest.raises(SiteConfigError, match="no manifest.csv"):
        resolve_site({"site-name": "a", "data-dir": str(tmp)}, cfg)
    name, site_dir = resolve_site({"partition-id": 0}, cfg)
    assert resolve_site({"site-name": name, "data-dir": str(site_dir)}, cfg) == (name, site_dir)


def test_site_seed_is_stable_and_site_specific() -> None:
    # Fixed by SHA-256 of "name:seed": the same in every process (unlike the salted hash()).
    assert site_seed("site_a", 0) == site_seed("site_a", 0)
    assert len({site_seed(f"site_{i}", 0) for i in range(50)}) == 50
    assert site_seed("site_a", 0) != site_seed("site_a", 1)

"""The server-side evaluation hook: per-round probe AUROC off the round's critical path."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import global_model_state, make_site, tiny_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import orchestration.server_eval as server_eval
from fedpanfm.data.dataset import pooled_dataset
from fedpanfm.data.manifest import CohortError
from fedpanfm.evaluation.embed import collate_dataset
from fedpanfm.evaluation.probe import probe_auroc
from fedpanfm.model.encoder import PanOrganEncoder
from fedpanfm.tb import RunLogger
from orchestration.server_eval import TEACHER_PREFIX, ServerProbe


@pytest.fixture
def cohort(tmp_path):
    cfg = tiny_config()
    organs = ["heart", "liver", "kidney"]
    make_site(tmp_path / "cohort" / "site_a", cfg, {f"a{k:02d}": organs for k in range(16)}, seed=1)
    make_site(tmp_path / "cohort" / "site_b", cfg, {f"b{k:02d}": organs[:2] for k in range(16)}, seed=2)
    return tmp_path / "cohort"


def _teacher(state: dict[str, torch.Tensor], cfg) -> PanOrganEncoder:
    enc = PanOrganEncoder(cfg)
    enc.load_state_dict({k[len(TEACHER_PREFIX):]: v for k, v in state.items() if k.startswith(TEACHER_PREFIX)})
    return enc.eval()


def _scalars(log_dir, tag: str) -> dict[int, float]:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_probe_runs_in_background_and_logs_each_round(cohort, tmp_path, monkeypatch) -> None:
    cfg = tiny_config([f"evaluation.server_cohort={cohort}"])
    gate = threading.Event()
    started = threading.Event()

    def gated_probe(*args, **kwargs):
        started.set()
        assert gate.wait(30), "test gate never opened"
        return probe_auroc(*args, **kwargs)

    monkeypatch.setattr(server_eval, "probe_auroc", gated_probe)
    logger = RunLogger(tmp_path / "tb", "server")
    hook = ServerProbe.from_config(cfg, logger)
    assert hook is not None
    states = {r: global_model_state(cfg, seed=r) for r in (1, 2, 3)}
    hook.submit(1, states[1])
    assert started.wait(30)
    # Round 1's probe is blocked: submitting rounds 2 and 3 must return at once. Round 2 is still
    # waiting when round 3 arrives, so it is skipped (the newest model is scored next).
    hook.submit(2, states[2])
    hook.submit(3, states[3])
    assert hook.results == {} and hook.skipped == [2]
    for v in states[3].values():  # the hook copied what it needs: the caller may change its state
        v.zero_()
    gate.set()
    results = hook.close()
    logger.close()
    assert sorted(results) == [1, 3]
    batches = collate_dataset(pooled_dataset(cohort, cfg), cfg)
    expected = probe_auroc(_teacher(global_model_state(cfg, seed=3), cfg), batches, cfg, cfg.seed)
    assert "probe/auroc_macro" in expected
    for tag, value in expected.items():
        assert results[3][tag] == pytest.approx(value, abs=1e-9)
    assert results[1]["probe/auroc_macro"] != pytest.approx(results[3]["probe/auroc_macro"], abs=1e-12)
    logged = _scalars(tmp_path / "tb" / "server", "probe/auroc_macro")
    assert logged == pytest.approx({1: results[1]["probe/auroc_macro"], 3: results[3]["probe/auroc_macro"]}, abs=1e-6)


def test_off_missing_cohort_and_bad_state(cohort, tmp_path) -> None:
    logger = RunLogger(tmp_path / "tb", "server")
    assert ServerProbe.from_config(tiny_config(), logger) is None
    with pytest.raises(CohortError, match="nowhere"):
        ServerProbe(tiny_config([f"evaluation.server_cohort={tmp_path / 'nowhere'}"]), logger)
    cfg = tiny_config([f"evaluation.server_cohort={cohort}"])
    hook = ServerProbe(cfg, logger)
    with pytest.raises(KeyError, match="teacher.encoder"):
        hook.submit(1, {"student.encoder.norm.weight": torch.ones(3)})
    # Weights of another architecture: the round fails in the background, training is not
    # interrupted, and close() reports the round.
    other = global_model_state(tiny_config(["model.dim=16", "model.heads=2"]))
    hook.submit(2, other)
    with pytest.raises(RuntimeError, match="round 2"):
        hook.close()
    logger.close()

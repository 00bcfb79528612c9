"""The benchmark's acceptance script (bench/cohort_acceptance.py): its configs honour --set."""

from __future__ import annotations

from bench.cohort_acceptance import acceptance_configs


def test_overrides_reach_the_encoders_and_the_evaluation_cohort_keeps_its_settings() -> None:
    cfg, eval_cfg = acceptance_configs("configs/study.yaml", ["evaluation.study.supervised_epochs=90",
                                                             "synth.subjects=50"])
    assert cfg.evaluation.study.supervised_epochs == 90
    assert cfg.synth.subjects == 50
    # The evaluation cohort's own settings win over an override of the same key.
    assert eval_cfg.evaluation.study.supervised_epochs == 90
    assert (eval_cfg.synth.sites, eval_cfg.synth.subjects, eval_cfg.synth.seed) == (2, 600, 1000)
    assert eval_cfg.synth.presence == "independent"


def test_without_overrides_the_study_config_is_used_as_written() -> None:
    cfg, _ = acceptance_configs("configs/study.yaml", [])
    assert cfg.evaluation.study.supervised_epochs == 30
    assert cfg.synth.subjects == 320

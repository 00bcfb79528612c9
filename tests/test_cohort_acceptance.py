"""The benchmark's acceptance script (bench/cohort_acceptance.py): its configs honour --set; its independent
texture statistics agree with the library's."""

from __future__ import annotations

import numpy as np
import torch
from conftest import make_batch, tiny_config

from bench.cohort_acceptance import acceptance_configs, texture_block
from fedpanfm.evaluation.baselines import texture_stats_features


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


def test_texture_block_matches_the_library_row() -> None:
    # The acceptance script's independent numpy texture statistics agree with the library's row
    # (torch pooling, quantiles and padding) on 2D and 3D images, scales that do not fit included.
    cfg = tiny_config()
    organs = cfg.data.organ_set().names
    k = organs.index("heart")
    g = torch.Generator().manual_seed(3)
    for images in (torch.rand(3, 1, 16, 12, generator=g), torch.rand(3, 1, 4, 10, 8, generator=g)):
        b = make_batch(cfg, [["heart"]] * 3)
        b.images["heart"] = images
        ours = texture_stats_features([b], scales=(1, 2, 4))[:, k * 10 + 1:(k + 1) * 10]
        theirs = texture_block(images[:, 0].numpy(), (1, 2, 4))
        assert np.allclose(ours.numpy(), theirs, atol=1e-4)

"""`fedpanfm evaluate` puts its ROC curves and robustness plots into TensorBoard's IMAGES tab."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config
from sklearn.metrics import auc

from fedpanfm.data.dataset import pooled_dataset
from fedpanfm.data.synthetic import generate_cohort
from fedpanfm.evaluation.embed import collate_dataset, random_encoder
from fedpanfm.evaluation.report import TB_IMAGES, evaluate_encoder, roc_points, write_report


@pytest.mark.timeout(600)
def test_evaluation_images_are_in_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(["synth.sites=2", "synth.subjects=20", "evaluation.bootstrap=0", "evaluation.random_draws=1",
                       "evaluation.baselines=false"])
    generate_cohort(tmp_path / "cohort", cfg)
    batches = collate_dataset(pooled_dataset(tmp_path / "cohort", cfg), cfg)
    result = evaluate_encoder(random_encoder(cfg, 0), cfg, batches, seed=0)
    curves = roc_points(result)
    assert curves, "no label had a probe and both classes in the test set"
    for label, (fpr, tpr, auroc) in curves.items():
        # The curve is the one the AUROC was computed from: its area is that AUROC.
        assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0 and np.all(np.diff(fpr) >= 0)
        assert auc(fpr, tpr) == pytest.approx(auroc, abs=1e-6), label

    paths = write_report(result, tmp_path / "out")
    acc = EventAccumulator(str(paths["tensorboard"]), size_guidance={"images": 0})
    acc.Reload()
    assert set(TB_IMAGES) <= set(acc.Tags()["images"])
    roc = acc.Images("evaluation/roc")[0]
    assert roc.width > 200 and roc.height > 200 and roc.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "out" / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

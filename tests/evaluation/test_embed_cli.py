"""``fedpanfm embed``: a cohort's CLS and per-organ embeddings under a checkpoint, as one .npz."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import global_model_state, make_site, tiny_config

from fedpanfm.checkpoint import save_checkpoint
from fedpanfm.cli import main
from fedpanfm.evaluation.embed import encoder_from_checkpoint


def test_embed_writes_cls_and_per_organ_embeddings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_config()
    ckpt = save_checkpoint(tmp_path / "ckpt", global_model_state(cfg), cfg, {"kind": "test"})
    make_site(tmp_path / "cohort" / "site_a", cfg, {f"a{k}": ["heart", "liver"] for k in range(5)}, seed=1)
    make_site(tmp_path / "cohort" / "site_b", cfg, {f"b{k}": ["brain"] for k in range(3)}, seed=2)
    assert main(["embed", "--checkpoint", str(ckpt), "--cohort", str(tmp_path / "cohort"),
                 "--out", str(tmp_path / "emb")]) == 0
    assert "8 subjects" in capsys.readouterr().out
    z = np.load(tmp_path / "emb.npz")  # no pickle needed
    n, o, d = 8, len(cfg.data.organ_set()), cfg.model.dim
    assert z["cls"].shape == (n, d) and z["organ"].shape == (n, o, d)
    assert z["present"].shape == (n, o) and z["attention"].shape == (n, o) and z["labels"].shape == (n, 2)
    assert list(z["organ_names"]) == list(cfg.data.organ_set().names)
    assert sorted(z["subject_ids"][:5]) == [f"a{k}" for k in range(5)] and set(z["sites"]) == {"site_a", "site_b"}
    # Per-organ rows are zero exactly where the organ is absent, and the attention sums to 1.
    present = z["present"]
    assert (np.abs(z["organ"]).sum(-1) > 0).tolist() == present.tolist()
    np.testing.assert_allclose(z["attention"].sum(1), 1.0, atol=1e-5)
    # Independent check: the CLS rows are the checkpoint's teacher encoder run on one subject.
    encoder, _ = encoder_from_checkpoint(ckpt)
    from fedpanfm.data.dataset import pooled_dataset
    from fedpanfm.evaluation.embed import collate_dataset

    (batch,) = collate_dataset(pooled_dataset(tmp_path / "cohort", cfg), cfg, batch_size=8)[:1]
    with torch.no_grad():
        cls = encoder(batch).cls.numpy()
    np.testing.assert_allclose(z["cls"], cls, rtol=1e-4, atol=1e-5)


def test_embed_names_a_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["embed", "--checkpoint", str(tmp_path / "nope"), "--cohort", str(tmp_path),
                 "--out", str(tmp_path / "e.npz")]) == 1
    assert "nope" in capsys.readouterr().err
